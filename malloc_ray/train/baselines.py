"""Non-neural reference points, evaluated on exactly the model's test split."""

from __future__ import annotations

import numpy as np

from malloc_ray.data.loader import Dataset, select_samples
from malloc_ray.data.prepare import last_train_prefix
from malloc_ray.metrics.ranking import auc, gauc


def train_item_counts(ds: Dataset) -> np.ndarray:
    """How often each item occurs among training interactions (each user's positions up to
    its last train target: valid and test targets are excluded, as for the model)."""
    lengths = np.diff(ds.offsets)
    position = np.arange(len(ds.items)) - np.repeat(ds.offsets[:-1], lengths)
    in_train = position <= np.repeat(last_train_prefix(lengths), lengths)
    return np.bincount(ds.items[in_train], minlength=ds.meta["vocab_size"])


def popularity_baseline(ds: Dataset, split: str = "test") -> dict[str, float]:
    """Score every target by its item's training popularity; AUC and GAUC on `split`."""
    rows = select_samples(ds, split, max_len=2)
    items, labels = ds.targets(rows)
    scores = train_item_counts(ds)[items].astype(np.float64)
    return {"auc": auc(labels, scores), "gauc": gauc(labels, scores, rows["user"].to_numpy()),
            "n": int(len(rows))}
