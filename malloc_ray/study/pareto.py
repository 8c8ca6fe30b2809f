"""Trade-off analysis of a trials table: seed means per (dataset, method, depth) and their
non-dominated (Pareto) sets over accuracy and cost.

A point is one (dataset, method, hyperparameters, depth) cell averaged over its `ok` seeds. Seeds that failed
(diverged, no_learning, oom, error) are counted in `n_failed` and never averaged in; a point
with no `ok` seed has no coordinates, so it is kept in the summary (listed, `on_front` False)
but cannot be on a front.

Baseline rows (category `baseline`: popularity, cooc, ... run by a study's `baselines`) are
summarized like any point, for the accuracy table, but are never on a front and never get a
ΔGAUC or verdict vs Native: they are reference scores, not memory methods.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from malloc_ray.study import stats

KEYS = ["dataset", "method", "depth"]
BASELINE = "baseline"  # the category of a baseline row
METRICS = ["auc", "gauc", "logloss"]
COSTS = ["macs_per_request", "kv_bytes_per_user", "kv_payload_bytes_per_user"]

# name -> objectives as (column, "max" | "min"); GAUC is the accuracy axis, as in the paper.
# Bytes are `kv_bytes_per_user`, payload + metadata: a front over payload alone would favour
# methods that file their state under metadata.
FRONTS = {
    "gauc_macs": [("gauc", "max"), ("macs_per_request", "min")],
    "gauc_bytes": [("gauc", "max"), ("kv_bytes_per_user", "min")],
    "gauc_macs_bytes": [("gauc", "max"), ("macs_per_request", "min"),
                        ("kv_bytes_per_user", "min")],
}


def non_dominated(values: np.ndarray, senses: list[str]) -> np.ndarray:
    """Mask of the rows of `values` (n × k) that no other row dominates.

    Row j dominates row i when j is at least as good on every objective and strictly better on
    one. Identical rows do not dominate each other, so ties are all kept. O(n²·k): fronts here
    have at most a few hundred points.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(senses):
        raise ValueError(f"expected an (n, {len(senses)}) array, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("objective values must not be NaN (drop failed points first)")
    # Turn every objective into "larger is better".
    signs = np.array([1.0 if s == "max" else -1.0 for s in senses])
    v = values * signs
    ge = (v[None, :, :] >= v[:, None, :]).all(axis=2)  # ge[i, j]: j at least as good as i
    gt = (v[None, :, :] > v[:, None, :]).any(axis=2)   # gt[i, j]: j strictly better somewhere
    return ~(ge & gt).any(axis=1)


def is_baseline(frame: pd.DataFrame) -> pd.Series:
    """Mask of the baseline rows of a trials table or summary."""
    if "category" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["category"] == BASELINE


def _label(method: str, hparams: str, variants: int) -> str:
    """The method's name, plus its hyperparameters when a study holds several (Optuna)."""
    if variants <= 1:
        return method
    hp = json.loads(hparams or "{}")
    return f"{method}(" + ",".join(f"{k}={v}" for k, v in sorted(hp.items())) + ")"


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, hparams, depth): mean and std of the metrics over `ok`
    seeds, the costs, and how many seeds ran, succeeded and failed (with their statuses).
    `label` names the point: the method, with its hyperparameters if it has several variants."""
    table = table.copy()
    table["hparams"] = table["hparams"].fillna("{}") if "hparams" in table else "{}"
    variants = table.groupby("method")["hparams"].nunique()
    rows = []
    for key, cell in table.groupby(KEYS + ["hparams"], sort=True, dropna=False):
        ok = cell[cell["status"] == "ok"]
        failed = cell[cell["status"] != "ok"]
        row = dict(zip(KEYS + ["hparams"], key))
        row["label"] = _label(row["method"], row["hparams"], variants[row["method"]])
        row.update(category=cell["category"].iloc[0], workflow=cell["workflow"].iloc[0],
                   n_seeds=len(cell), n_ok=len(ok), n_failed=len(failed),
                   failed_statuses=",".join(sorted(set(failed["status"]))))
        for col in METRICS:
            values = pd.to_numeric(ok[col], errors="coerce").astype(float)
            row[col] = values.mean() if len(ok) else np.nan
            # One ok seed has no spread to report: NaN, not a misleading 0.
            row[f"{col}_std"] = values.std(ddof=0) if len(ok) > 1 else np.nan
            row[f"{col}_ci95"] = stats.ci95(values)
        for col in COSTS:  # cost is a property of the configuration, not of the seed
            values = pd.to_numeric(cell[col], errors="coerce").astype(float)
            row[col] = values.mean() if values.notna().any() else np.nan
        rows.append(row)
    return _with_deltas(pd.DataFrame(rows), table)


def _with_deltas(summary: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """GAUC minus Native's, paired by seed, its 95% interval and the verdict it supports."""
    deltas = stats.paired_deltas(table, "gauc").rename(columns={
        "delta": "delta_gauc_vs_native", "delta_ci95": "delta_gauc_vs_native_ci95",
        "n_pairs": "n_pairs_vs_native"})
    summary = summary.merge(deltas, on=["dataset", "method", "hparams", "depth"], how="left")
    summary["n_pairs_vs_native"] = summary["n_pairs_vs_native"].fillna(0).astype(int)
    is_native = summary["method"] == stats.NATIVE
    no_delta = is_native | is_baseline(summary)  # baselines are references, not compared
    summary.loc[no_delta, ["delta_gauc_vs_native", "delta_gauc_vs_native_ci95"]] = np.nan
    summary.loc[is_baseline(summary), "n_pairs_vs_native"] = 0
    summary["verdict_vs_native"] = [
        "n/a" if skip else stats.verdict(d, h)
        for skip, d, h in zip(no_delta, summary["delta_gauc_vs_native"],
                                summary["delta_gauc_vs_native_ci95"])]
    return summary


def native_learned(summary: pd.DataFrame) -> dict[str, bool]:
    """Per dataset: whether Native has at least one `ok` seed (it learned) at some depth.
    Where it has none, the study measured no method against it on that dataset."""
    native = summary[summary["method"] == stats.NATIVE]
    return {ds: bool((native[native["dataset"] == ds]["n_ok"] > 0).any())
            for ds in sorted(summary["dataset"].unique())}


def pareto_table(table: pd.DataFrame, per_depth: bool = False) -> pd.DataFrame:
    """The summary with one boolean column `front_<name>` per entry of FRONTS.

    Fronts are computed within each dataset (over every method × depth point), or within each
    (dataset, depth) with `per_depth`. Points without an `ok` seed, and baselines, are never
    on a front.
    """
    summary = summarize(table)
    for name in FRONTS:
        summary[f"front_{name}"] = False
    groups = ["dataset", "depth"] if per_depth else ["dataset"]
    for _, part in summary.groupby(groups, sort=False):
        for name, objectives in FRONTS.items():
            cols = [c for c, _ in objectives]
            usable = part[part[cols].notna().all(axis=1) & (part["n_ok"] > 0)
                          & ~is_baseline(part)]
            if usable.empty:
                continue
            mask = non_dominated(usable[cols].to_numpy(), [s for _, s in objectives])
            summary.loc[usable.index[mask], f"front_{name}"] = True
    return summary


def failed_cells(table: pd.DataFrame) -> pd.DataFrame:
    """Every trial whose status is not ok, with where and why it failed."""
    cols = ["dataset", "method", "depth", "seed", "status", "failed_epoch", "reason",
            "mlflow_run_id"]
    failed = table[table["status"] != "ok"]
    return failed[[c for c in cols if c in failed.columns]].reset_index(drop=True)
