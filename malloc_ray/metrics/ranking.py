"""Ranking metrics for CTR evaluation: AUC, GAUC and Logloss on target positions, in torchmetrics.

AUC is the area under torchmetrics' exact binary ROC curve (no thresholds; tied scores count
half, as in sklearn's `roc_auc_score`). GAUC follows FuxiCTR (`fuxictr/metrics.py`) and DIN: the AUROC of each group
(user), weighted by the group's number of samples; groups whose labels are all 0 or all 1 are
skipped. Logloss is binary cross-entropy on probabilities clipped to [eps, 1 - eps]. Everything
runs in float64 on the device the tensors are on (a trial's evaluation stays on its GPU).

Where sklearn raises (single-class labels, NaN scores, no samples) these return nan: a model
that outputs NaN or a tiny split should be recorded as such by the training loop, not crash a
trial. tests/ranking_oracle.py (numpy ranks) and sklearn check these to 1e-9.
"""

from __future__ import annotations


import numpy as np
import torch

# torchmetrics is imported where it is first used: its package import pulls in scipy.signal
# and matplotlib (2 s on the project's CPU machine), which every `malloc-ray` command and study
# driver would otherwise pay without computing a metric.

NAN = float("nan")


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        # A read-only array (pandas' copy-on-write hands out such views) would be shared;
        # the metrics only read, but torch warns, so such an array is copied.
        x = torch.as_tensor(x if x.flags.writeable else x.copy())
    return x.detach().reshape(-1).to(dtype)


def _labels_and_scores(labels, scores) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = _as_tensor(labels), _as_tensor(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.numel()} vs {s.numel()}")
    s = s.to(y.device)
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def _exact_auroc(y: torch.Tensor, s: torch.Tensor, positives: int) -> float:
    """Area under torchmetrics' exact ROC curve (one point per distinct score, so ties count
    half). The curve comes in float32; its points are exact counts over the class sizes, so
    they are turned back into counts and integrated in float64 (1e-9 against sklearn, where
    torchmetrics' own float32 trapezoid drifts by 1e-7)."""
    # torchmetrics reads scores outside [0, 1] as logits and squashes them (large counts would
    # then tie in float32): hand it dense ranks in (0, 1], same order, same ties.
    _, rank = torch.unique(s, return_inverse=True)
    s = (rank.double() + 1) / (int(rank.max()) + 1)
    from torchmetrics.functional.classification import binary_roc

    fpr, tpr, _ = binary_roc(s, y.long(), thresholds=None, validate_args=False)
    negatives = y.numel() - positives
    fps = torch.round(fpr.double() * negatives)
    tps = torch.round(tpr.double() * positives)
    area = ((fps[1:] - fps[:-1]) * (tps[1:] + tps[:-1])).sum() / 2
    return float(area / (positives * negatives))


def _auroc(y: torch.Tensor, s: torch.Tensor) -> float:
    """Exact AUROC; nan where it is undefined (torchmetrics would warn and return 0)."""
    positives = int(y.sum())
    if positives in (0, y.numel()) or torch.isnan(s).any():
        return NAN
    return _exact_auroc(y, s, positives)


def auc(labels, scores) -> float:
    """ROC AUC; nan if all labels are equal or a score is NaN."""
    return _auroc(*_labels_and_scores(labels, scores))


def gauc(labels, scores, groups) -> float:
    """Sample-count-weighted mean of per-group AUC over groups with both classes; nan if none has."""
    y, s = _labels_and_scores(labels, scores)
    g = _as_tensor(groups, torch.int64).to(y.device)
    if g.numel() != y.numel():
        raise ValueError(f"groups and labels differ in size: {g.numel()} vs {y.numel()}")
    if y.numel() == 0 or torch.isnan(s).any():
        return NAN
    _, codes = torch.unique(g, return_inverse=True)
    counts = torch.bincount(codes)
    positives = torch.bincount(codes, weights=y)
    mixed = ((positives > 0) & (positives < counts)).tolist()
    positives = positives.long().tolist()
    order = torch.argsort(codes, stable=True)
    total, weight = 0.0, 0
    # One AUROC per group with both classes: users are few hundred to some ten thousand per
    # evaluation, and single-class groups (most users of a sparse split) are skipped unscored.
    for group, (ys, ss) in enumerate(zip(y[order].split(counts.tolist()),
                                         s[order].split(counts.tolist()))):
        if mixed[group]:
            total += _exact_auroc(ys, ss, positives[group]) * ys.numel()
            weight += ys.numel()
    return total / weight if weight else NAN


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1-eps] so a confident miss stays finite."""
    y, p = _labels_and_scores(labels, probs)
    if y.numel() == 0 or torch.isnan(p).any():  # torch refuses NaN probabilities
        return NAN
    return float(torch.nn.functional.binary_cross_entropy(p.clamp(eps, 1.0 - eps), y))


def ranking_metrics(labels, probs, groups) -> dict[str, float]:
    """AUC, GAUC (grouped by `groups`, normally the user id) and Logloss of click probabilities."""
    return {"auc": auc(labels, probs), "gauc": gauc(labels, probs, groups),
            "logloss": logloss(labels, probs)}


