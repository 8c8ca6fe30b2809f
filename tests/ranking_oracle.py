"""Test oracle for malloc_ray/metrics/ranking.py: AUC, GAUC and Logloss from ranks in numpy.

This was the project's metric code before the metrics moved to torchmetrics; it stays as an
independent second computation (beside per-user sklearn) that the torchmetrics path must match.

GAUC follows FuxiCTR (`fuxictr/metrics.py`) and DIN: the AUC of each group (user), weighted by the
group's number of samples; groups whose labels are all 0 or all 1 are skipped. Everything is computed
from ranks in one pass (no loop over groups or samples), with tied scores given their average rank,
which is what sklearn's `roc_auc_score` does.

Where sklearn raises (single-class labels, NaN scores) these return nan: a model that outputs NaN or a
tiny split should be recorded as such by the training loop, not crash a trial.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _group_auc(labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, n_groups: int):
    """Per-group AUC (nan where a group has one class) and per-group sample counts.

    Mann-Whitney form: AUC_g = (sum of positive ranks - P(P+1)/2) / (P·N), ranks taken within the group.
    """
    order = np.lexsort((scores, codes))
    s, g, y = scores[order], codes[order], labels[order]
    n = s.size
    counts = np.bincount(g, minlength=n_groups)
    group_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # A tie run is a maximal stretch of equal (group, score); every member gets the run's mean position.
    new_run = np.empty(n, dtype=bool)
    new_run[:1] = True
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)
    run_last = np.append(run_first[1:], n) - 1
    position = (run_first + run_last)[run_id] / 2.0
    rank = position - group_start[g] + 1.0
    n_pos = np.bincount(g, weights=y, minlength=n_groups)
    rank_pos = np.bincount(g, weights=rank * y, minlength=n_groups)
    n_neg = counts - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        aucs = (rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    aucs[(n_pos == 0) | (n_neg == 0)] = np.nan
    return aucs, counts


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _as_numpy(labels, np.float64)
    s = _as_numpy(scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def auc(labels, scores) -> float:
    """ROC AUC; nan if all labels are equal."""
    y, s = _labels_and_scores(labels, scores)
    if y.size == 0 or np.isnan(s).any():
        return float("nan")
    aucs, _ = _group_auc(y, s, np.zeros(y.size, dtype=np.int64), 1)
    return float(aucs[0])


def gauc(labels, scores, groups) -> float:
    """Sample-count-weighted mean of per-group AUC over groups with both classes; nan if none has."""
    y, s = _labels_and_scores(labels, scores)
    g = _as_numpy(groups, None)
    if g.size != y.size:
        raise ValueError(f"groups and labels differ in size: {g.size} vs {y.size}")
    if y.size == 0 or np.isnan(s).any():
        return float("nan")
    _, codes = np.unique(g, return_inverse=True)
    codes = codes.reshape(-1)
    aucs, counts = _group_auc(y, s, codes, int(codes.max()) + 1)
    valid = ~np.isnan(aucs)
    if not valid.any():
        return float("nan")
    return float(np.sum(aucs[valid] * counts[valid]) / np.sum(counts[valid]))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1-eps] so a confident miss stays finite."""
    y, p = _labels_and_scores(labels, probs)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def ranking_metrics(labels, probs, groups) -> dict[str, float]:
    """AUC, GAUC (grouped by `groups`, normally the user id) and Logloss of click probabilities."""
    return {"auc": auc(labels, probs), "gauc": gauc(labels, probs, groups),
            "logloss": logloss(labels, probs)}
