"""Reference points for the HSTU model, scored on exactly the samples (and candidates) the model
is evaluated on: `select_samples(ds, split, ...)` and `Dataset.targets`.

* `popularity`: an item's number of training interactions.
* `cooc`: how often the candidate co-occurs with the user's recent positives, counted on the
  training part of every user's sequence only (no valid or test target enters the counts).
* `din`, `bst`: torch-rechub's DIN and BST trained on our train split (`malloc_ray.train.peers`).

Every baseline reports the same JSON fields (`BASELINES`, `run_baseline`); docs/baselines.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from malloc_ray.data.loader import Dataset, select_samples
from malloc_ray.data.prepare import last_train_prefix
from malloc_ray.metrics.ranking import auc, gauc

BASELINES = ("popularity", "cooc", "din", "bst")
PEERS = ("din", "bst")  # library models: the optional extra [peers]


def trial_default(name: str):
    """A TrialConfig field's default, read when asked (the training recipe may change it)."""
    from malloc_ray.config import TrialConfig

    return next(f.default for f in fields(TrialConfig) if f.name == name)


def _train_mask(ds: Dataset) -> np.ndarray:
    """Per interaction: is it in its user's training part (positions up to the last train
    target; valid and test targets are excluded, as for the model)."""
    lengths = np.diff(ds.offsets)
    position = np.arange(len(ds.items)) - np.repeat(ds.offsets[:-1], lengths)
    return position <= np.repeat(last_train_prefix(lengths), lengths)


def train_item_counts(ds: Dataset) -> np.ndarray:
    """How often each item occurs among training interactions (each user's positions up to
    its last train target: valid and test targets are excluded, as for the model)."""
    return np.bincount(ds.items[_train_mask(ds)], minlength=ds.meta["vocab_size"])


def popularity_baseline(ds: Dataset, split: str = "test") -> dict[str, float]:
    """Score every target by its item's training popularity; AUC and GAUC on `split`."""
    rows = select_samples(ds, split, max_len=2)
    items, labels = ds.targets(rows)
    scores = train_item_counts(ds)[items].astype(np.float64)
    return {"auc": auc(labels, scores), "gauc": gauc(labels, scores, rows["user"].to_numpy()),
            "n": int(len(rows))}


@dataclass
class CoocCounts:
    """Directed co-occurrence counts: `counts[k]` times item a preceded item b within `window`
    interactions, both positive, in one user's training part; keys[k] = a * vocab + b, sorted."""

    keys: np.ndarray  # int64, sorted, unique
    counts: np.ndarray  # int64
    popularity: np.ndarray  # train_item_counts
    vocab: int
    window: int

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        key = a.astype(np.int64) * self.vocab + b.astype(np.int64)
        if not len(self.keys):
            return np.zeros(key.shape, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        return np.where(self.keys[at] == key, self.counts[at], 0)


def fit_cooc(ds: Dataset, window: int) -> CoocCounts:
    """Count positive pairs (a then b, at most `window` interactions apart) inside each user's
    training part. Only interactions up to the user's last train target are read."""
    if window < 1:
        raise ValueError("window must be >= 1")
    vocab = int(ds.meta["vocab_size"])
    in_train = _train_mask(ds)
    positive = in_train & (ds.labels == 1)
    user = np.repeat(np.arange(len(ds.offsets) - 1), np.diff(ds.offsets))
    keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    pending: list[np.ndarray] = []  # new pair keys, merged into (keys, counts) in bulk

    def merge() -> tuple[np.ndarray, np.ndarray]:
        new = np.concatenate(pending)
        pending.clear()
        merged, inverse = np.unique(np.concatenate([keys, new]), return_inverse=True)
        weights = np.concatenate([counts, np.ones(len(new), np.int64)])
        return merged, np.bincount(inverse, weights=weights, minlength=len(merged)).astype(
            np.int64)

    items = ds.items.astype(np.int64)
    for lag in range(1, min(window, len(items) - 1) + 1):
        later = np.arange(lag, len(items))
        ok = positive[later] & positive[later - lag] & (user[later] == user[later - lag])
        pending.append(items[later - lag][ok] * vocab + items[later][ok])
        if sum(map(len, pending)) > 8_000_000:
            keys, counts = merge()
    if pending:
        keys, counts = merge()
    return CoocCounts(keys=keys, counts=counts, popularity=train_item_counts(ds), vocab=vocab,
                      window=window)


def cooc_scores(ds: Dataset, rows, fitted: CoocCounts, chunk: int = 4096) -> np.ndarray:
    """Mean co-occurrence (both orders) of each row's candidate with the positives among the
    `window` interactions before it; ties (no co-occurring positive) broken by popularity."""
    items, _ = ds.targets(rows)
    user = rows["user"].to_numpy().astype(np.int64)
    prefix = rows["prefix_len"].to_numpy().astype(np.int64)
    start = ds.offsets[user]
    pop = fitted.popularity
    tie = 1e-6 * pop[items] / max(int(pop.max()) if len(pop) else 1, 1)
    out = np.empty(len(rows), dtype=np.float64)
    lags = np.arange(1, fitted.window + 1)
    for lo in range(0, len(rows), chunk):
        sl = slice(lo, lo + chunk)
        at = (start[sl] + prefix[sl])[:, None] - lags[None, :]  # the window before the target
        real = at >= start[sl][:, None]
        at = np.where(real, at, 0)
        hist_pos = real & (ds.labels[at] == 1)
        hist = ds.items[at]
        cand = np.broadcast_to(items[sl][:, None], hist.shape)
        pair = fitted.lookup(hist, cand) + fitted.lookup(cand, hist)
        n = hist_pos.sum(1)
        out[sl] = np.where(hist_pos, pair, 0).sum(1) / np.maximum(n, 1)
    return out + tie


def cooc_baseline(ds: Dataset, split: str = "test", max_len: int | None = None) -> dict:
    """`cooc` on `split`: the history window is the trial's (max_len - 1 interactions)."""
    max_len = max_len or trial_default("max_len")
    rows = select_samples(ds, split, max_len=max(max_len, 2))
    t0 = time.perf_counter()
    fitted = fit_cooc(ds, window=max(max_len - 1, 1))
    seconds = time.perf_counter() - t0
    _, labels = ds.targets(rows)
    scores = cooc_scores(ds, rows, fitted)
    return {"auc": auc(labels, scores), "gauc": gauc(labels, scores, rows["user"].to_numpy()),
            "n": int(len(rows)), "train_seconds": seconds}


def run_baseline(name: str, ds: Dataset, split: str = "test", *, max_len: int | None = None,
                 epochs: int | None = None, seed: int = 0, smoke_test: bool = False,
                 **peer_options) -> dict:
    """One baseline on `split`, as the JSON the CLI prints: baseline, split, auc, gauc,
    logloss (null where the scores are not probabilities), n, and train_seconds where
    something is fitted."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}")
    if name == "popularity":
        result = popularity_baseline(ds, split)
    elif name == "cooc":
        result = cooc_baseline(ds, split, max_len)
    else:
        from malloc_ray.train.peers import peer_baseline

        result = peer_baseline(name, ds, split, max_len=max_len, epochs=epochs, seed=seed,
                               smoke_test=smoke_test, **peer_options)
    head = {"baseline": name, "split": split, "auc": result["auc"], "gauc": result["gauc"],
            "logloss": result.get("logloss"), "n": result["n"]}
    return {**head, **{k: v for k, v in result.items() if k not in head}}
