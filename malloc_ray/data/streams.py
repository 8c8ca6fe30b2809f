"""Evaluation as a server would do it: per user, the history before the first evaluated target
once, then the targets in time order, each scored and then appended with its label.

This is the `stream` evaluation protocol (TrialConfig.eval_protocol). A `window` evaluation
builds one fresh window per target (O(L^2) per target with full attention); a stream batch
holds each user's history once and every target of the split after it, so the model
prefills once and appends (O(L) per target with a cache). Both see the same earlier
interactions and labels. The cap on history is the same for every method: the history before
a user's first target keeps its most recent max_len - K interactions (K: the user's targets in
the split), so the last target sees at most max_len - 1 earlier interactions, as in a window.
Where a user's history and targets fit in max_len, the two protocols score identical inputs.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from malloc_ray.data.loader import Dataset, select_samples
from malloc_ray.errors import InputError


def user_streams(ds: Dataset, split: str, max_len: int) -> tuple[np.ndarray, ...]:
    """Per user with targets in `split`: (user, history start, first target, target count)."""
    if ds.has_candidates:
        raise InputError("stream evaluation appends each target as an interaction; this "
                         "dataset scores sampled candidates, which are not interactions: use "
                         "eval_protocol: window", key="eval_protocol")
    rows = select_samples(ds, split, max_len)
    users, first = rows["user"].to_numpy(), rows["prefix_len"].to_numpy()
    order = np.lexsort((first, users))
    users, first = users[order], first[order]
    uniq, start_idx, count = np.unique(users, return_index=True, return_counts=True)
    first_target = first[start_idx]
    # targets of a split are consecutive interactions (data/prepare.py's split protocol)
    if np.any(first[start_idx + count - 1] != first_target + count - 1):
        raise ValueError("a user's targets in one split are not consecutive")
    keep = np.maximum(max_len - count, 1)
    history_start = np.maximum(first_target - keep, 0)
    return uniq, history_start, first_target, count


def _same_count_batches(count: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Indices of up to batch_size users with the same number of targets, fewest first.
    Without padded targets nothing is appended past a user's own history cap: a padded
    target of a capped history would sit at position 2 max_len or later, which methods with
    position-indexed weights (Linformer's E) do not have."""
    order = np.argsort(count, kind="stable")
    bounds = np.flatnonzero(np.diff(count[order])) + 1
    for group in np.split(order, bounds):
        for lo in range(0, len(group), batch_size):
            yield group[lo:lo + batch_size]


def stream_batches(ds: Dataset, split: str, max_len: int, batch_size: int
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of users with the same number of targets K: `items`/`labels`/`lengths` hold
    each history (left padded), and `targets`/`target_labels`/`target_mask` (B, K) the
    split's targets in time order. `eval_labels` and `eval_users` are the targets' labels and
    users, flattened in the order a stream prediction returns them (row-major over the mask)."""
    users, h_start, first, count = user_streams(ds, split, max_len)
    arrays = ds.arrays
    for sl in _same_count_batches(count, batch_size):
        u, hs, ft, k = users[sl], h_start[sl], first[sl], count[sl]
        base = arrays.offsets[u]
        hist_len = ft - hs
        width, kmax = int(hist_len.max()), int(k.max())
        col = np.arange(width)[None, :] - (width - hist_len)[:, None]
        real = col >= 0
        flat = np.where(real, base[:, None] + hs[:, None] + col, 0)
        tcol = np.arange(kmax)[None, :]
        mask = tcol < k[:, None]
        tflat = np.where(mask, base[:, None] + ft[:, None] + tcol, 0)
        target_labels = np.where(mask, arrays.labels[tflat], 0).astype(np.int64)
        yield {
            "items": torch.from_numpy(np.where(real, arrays.items[flat], 0).astype(np.int64)),
            "labels": torch.from_numpy(np.where(real, arrays.labels[flat], 0).astype(np.int64)),
            "lengths": torch.from_numpy(hist_len.astype(np.int64)),
            "user": torch.from_numpy(u.astype(np.int64)),
            "targets": torch.from_numpy(np.where(mask, arrays.items[tflat], 0).astype(np.int64)),
            "target_labels": torch.from_numpy(target_labels),
            "target_mask": torch.from_numpy(mask),
            "eval_labels": torch.from_numpy(target_labels[mask]),
            "eval_users": torch.from_numpy(np.repeat(u, k).astype(np.int64)),
        }
