"""Uncertainty over seeds: 95% intervals, paired differences against Native, verdicts.

A benchmark's comparison is a finding only when it is bigger than the seed-to-seed noise. Every
compared number gets a t-based 95% confidence interval over its seeds; a method's difference to
Native is taken paired by seed (same dataset, depth and seed: the seed fixes the initialisation
and the batch order both runs share) and is called better or worse only when its own interval
excludes 0. With one seed (or one pair) there is no interval and no verdict.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

NATIVE = "native"
VERDICTS = ("better", "worse", "≈", "n/a")


def ci95(values) -> float:
    """Half-width of the two-sided 95% t interval of the mean; NaN with fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan
    from scipy import stats as scipy_stats  # here: its import costs every driver 0.8 s

    return float(scipy_stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def verdict(delta: float, half_width: float, higher_is_better: bool = True) -> str:
    """`better` / `worse` when delta ± half_width excludes 0, else `≈`; `n/a` without an
    interval."""
    if not (np.isfinite(delta) and np.isfinite(half_width)):
        return "n/a"
    if delta - half_width > 0:
        return "better" if higher_is_better else "worse"
    if delta + half_width < 0:
        return "worse" if higher_is_better else "better"
    return "≈"


def paired_deltas(table: pd.DataFrame, metric: str = "gauc") -> pd.DataFrame:
    """Per (dataset, method, hparams, depth): the seeds where both it and Native of the same
    (dataset, depth) are `ok`, the mean of (method − Native) over them and its 95% half-width."""
    ok = table[table["status"] == "ok"].copy()
    ok["hparams"] = ok["hparams"].fillna("{}") if "hparams" in ok else "{}"
    native = ok[ok["method"] == NATIVE].groupby(["dataset", "depth", "seed"])[metric].mean()
    rows = []
    for key, cell in ok.groupby(["dataset", "method", "hparams", "depth"], sort=True):
        dataset, method, _, depth = key
        ref = native.reindex(pd.MultiIndex.from_arrays(
            [[dataset] * len(cell), [depth] * len(cell), cell["seed"].to_numpy()]))
        diff = cell[metric].to_numpy(float) - ref.to_numpy(float)
        rows.append(dict(zip(["dataset", "method", "hparams", "depth"], key), **_paired(diff)))
    return pd.DataFrame(rows, columns=["dataset", "method", "hparams", "depth", "n_pairs",
                                       "delta", "delta_ci95"])


def depth_deltas(table: pd.DataFrame, metric: str = "gauc") -> pd.DataFrame:
    """Per (dataset, method, hparams, depth) above the shallowest depth that method ran on the
    dataset: the seeds `ok` at both depths, the mean of (metric at this depth − at the
    shallowest) over them and its 95% half-width. The seed pairs the two runs as it pairs a
    method with Native (Figure 5's question: does going deeper change the method's score
    beyond seed noise?)."""
    table = table.assign(hparams=table["hparams"].fillna("{}") if "hparams" in table else "{}")
    cols = ["dataset", "method", "hparams", "depth", "n_pairs", "base_depth", "delta",
            "delta_ci95"]
    rows = []
    for key, cell in table.groupby(["dataset", "method", "hparams"], sort=True):
        base = cell["depth"].min()  # over every cell, so a failed shallowest depth is seen
        ok = cell[cell["status"] == "ok"]
        by = ok.groupby(["depth", "seed"])[metric].mean().unstack("seed")
        if base not in by.index:
            continue  # no ok seed at the shallowest depth: nothing to pair with
        for depth in sorted(d for d in by.index if d != base):
            diff = (by.loc[depth] - by.loc[base]).to_numpy(float)
            rows.append(dict(zip(["dataset", "method", "hparams"], key), depth=depth,
                             base_depth=base, **_paired(diff)))
    return pd.DataFrame(rows, columns=cols)


def _paired(diff: np.ndarray) -> dict:
    """n_pairs, delta (mean) and delta_ci95 of the finite paired differences."""
    diff = diff[np.isfinite(diff)]
    return {"n_pairs": len(diff), "delta": float(diff.mean()) if len(diff) else math.nan,
            "delta_ci95": ci95(diff)}


def separated_best(means, half_widths, higher_is_better: bool = True) -> np.ndarray:
    """Mask of the best cell, only when its interval does not overlap the runner-up's.

    Cells without an interval (one seed) cannot be told apart from their neighbours: nothing
    is marked when the best or the runner-up lacks one."""
    m, h = np.asarray(means, dtype=float), np.asarray(half_widths, dtype=float)
    mask = np.zeros(len(m), dtype=bool)
    finite = np.flatnonzero(np.isfinite(m))
    if len(finite) < 2:
        return mask
    order = finite[np.argsort(-m[finite] if higher_is_better else m[finite], kind="stable")]
    best, second = order[0], order[1]
    if not (np.isfinite(h[best]) and np.isfinite(h[second])):
        return mask
    if higher_is_better:
        apart = m[best] - h[best] > m[second] + h[second]
    else:
        apart = m[best] + h[best] < m[second] - h[second]
    mask[best] = bool(apart)
    return mask


def fmt_interval(mean: float, half_width: float, n: int, digits: int = 4) -> str:
    """`0.6512 ± 0.0040 (3 seeds)`; one seed: `0.6512 (1 seed, no interval)`."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if not np.isfinite(half_width):
        return f"{mean:.{digits}f} ({int(n)} seed{'s' if n != 1 else ''}, no interval)"
    return f"{mean:.{digits}f} ± {half_width:.{digits}f} ({int(n)} seeds)"
