"""Label-stream leak audit: how well the labels alone predict a target's label.

HSTU sees every earlier label token, so a dataset whose label stream has structure (one negative
after every positive, say) hands the model the answer through the position: a real Amazon set
built that way gave test AUC 1.0. Before any AUC is trusted, a predictor that sees only the label
stream must predict nothing.

The predictor reads, per sample, the previous `HISTORY_LABELS` labels of the window (padding where
the history is shorter) and the parity of prefix_len, and no item id. It is a lookup table: the
smoothed positive rate of each of those feature patterns among the train samples, so it captures
any function of them (a logistic regression would miss parity x label interactions). Its AUC on
the valid split is `label_stream_auc`; 0.5 means the label stream carries nothing.
"""

from __future__ import annotations

import numpy as np

HISTORY_LABELS = 4
WARN_ABOVE = 0.60  # prepare warns (and --strict fails) above this
_PAD = 2  # a label slot before the user's first interaction


def target_labels(lengths: np.ndarray, labels: np.ndarray, samples: dict) -> np.ndarray:
    """Each sample's label: explicit (`label` column) or the interaction at prefix_len."""
    if "label" in samples:
        return np.asarray(samples["label"], dtype=np.int8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return labels[offsets[samples["user"]] + samples["prefix_len"]]


def label_patterns(lengths: np.ndarray, labels: np.ndarray, user: np.ndarray,
                   prefix: np.ndarray) -> np.ndarray:
    """One integer per sample encoding its previous labels (base 3) and prefix parity."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prefix = np.asarray(prefix, dtype=np.int64)
    code = (prefix % 2).astype(np.int64)
    for j in range(1, HISTORY_LABELS + 1):
        inside = prefix - j >= 0
        at = np.where(inside, offsets[user] + prefix - j, 0)
        code = code * 3 + np.where(inside, labels[at], _PAD)
    return code


def label_stream_auc(lengths: np.ndarray, labels: np.ndarray, samples: dict,
                     splits: tuple[str, ...] = ("train", "valid", "test")) -> float | None:
    """AUC on the valid samples of the label-stream predictor fit on the train samples.

    `samples` holds user, prefix_len, split (index into `splits`) and optionally label. None when
    the valid split has a single class (no AUC is defined)."""
    y = target_labels(lengths, labels, samples).astype(np.float64)
    code = label_patterns(lengths, labels.astype(np.int64), np.asarray(samples["user"]),
                          samples["prefix_len"])
    split = np.asarray(samples["split"])
    train, valid = split == splits.index("train"), split == splits.index("valid")
    if not train.any() or not valid.any():
        return None
    prior = float(y[train].mean())
    size = int(code.max()) + 1
    pos = np.bincount(code[train], weights=y[train], minlength=size)
    seen = np.bincount(code[train], minlength=size)
    rate = (pos + prior) / (seen + 1.0)  # one pseudo-sample at the prior: unseen patterns get it
    # imported here: the metrics import torch (1.3 s), which `data stats` never needs
    from malloc_ray.metrics.ranking import auc

    score = auc(y[valid], rate[code[valid]])
    return None if np.isnan(score) else round(float(score), 4)


def leak_message(name: str, value: float | None) -> str | None:
    """The warning for a dataset whose label stream predicts its targets; None when it doesn't."""
    if value is None or value <= WARN_ABOVE:
        return None
    return (f"dataset {name!r}: label_stream_auc {value:.4f} > {WARN_ABOVE:.2f}: the previous "
            f"{HISTORY_LABELS} labels and the position parity alone, no item id, predict the "
            f"valid targets this well; a model that sees earlier labels gets that for free, and "
            f"where labels or negatives were placed by a rule it is a leak (docs/data.md, "
            f"'Label-stream audit')")
