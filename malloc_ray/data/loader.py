"""Dataset dir -> padded torch batches, from plain Python or from Ray Data.

A sample (user u, prefix_len p) becomes the window of u's interactions
[max(0, p - max_len + 1), p]: the history followed by the target in the LAST column. A sample
that names its candidate (datasets with a `candidate` column, docs/data.md) puts that item and
its label in the last column instead, so a negative never enters anybody's history.
Rows are left-padded with item 0 / label 0 to the batch's longest window. Both iterators share
`collate`, so they produce identical batches for the same samples in the same order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch

from malloc_ray.config import LOSS_POSITIONS, TRAIN_NEGATIVES
from malloc_ray.data.prepare import SPLITS, last_train_prefix, read_meta
from malloc_ray.data.sources.sequences import draw_untouched
from malloc_ray.errors import InputError
from malloc_ray.files import read_parquet


@dataclass
class UserArrays:
    """Flat sequences: user u's interactions are [offsets[u], offsets[u+1])."""

    offsets: np.ndarray  # int64, len users + 1
    items: np.ndarray  # int32
    labels: np.ndarray  # int8


@dataclass
class Dataset:
    path: Path
    meta: dict
    arrays: UserArrays
    samples: pd.DataFrame  # user, prefix_len, split, user_len[, candidate, label]; by user, prefix

    @property
    def has_candidates(self) -> bool:
        """Samples name their candidate item and label (negatives outside the history)."""
        return "candidate" in self.samples.columns

    def targets(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(item, label) each selected sample row scores."""
        if "candidate" in rows:
            return rows["candidate"].to_numpy(), rows["label"].to_numpy()
        at = self.offsets[rows["user"].to_numpy()] + rows["prefix_len"].to_numpy()
        return self.items[at], self.labels[at]

    @property
    def offsets(self) -> np.ndarray:
        return self.arrays.offsets

    @property
    def items(self) -> np.ndarray:
        return self.arrays.items

    @property
    def labels(self) -> np.ndarray:
        return self.arrays.labels


def load_dataset(directory: str | Path) -> Dataset:
    """Read a dataset dir written by `malloc_ray.data.prepare` into numpy/pandas."""
    path = Path(directory)
    meta = read_meta(path)
    users_file = path / "users.parquet"
    users = read_parquet(users_file, columns=["user", "items", "labels"])
    if not np.array_equal(users.column("user").to_numpy(), np.arange(users.num_rows)):
        raise InputError("users are not the dense ids 0..U-1 in order", file=str(users_file),
                         key="user")
    lengths = pc.list_value_length(users.column("items")).to_numpy(zero_copy_only=False)
    arrays = UserArrays(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=pc.list_flatten(users.column("items")).to_numpy().astype(np.int32, copy=False),
        labels=pc.list_flatten(users.column("labels")).to_numpy().astype(np.int8, copy=False))
    if arrays.items.size and not (0 < arrays.items.min() and
                                  arrays.items.max() < meta["vocab_size"]):
        raise InputError(f"item ids outside 1..{meta['vocab_size'] - 1}", file=str(users_file),
                         key="items")
    samples = read_parquet(path / "samples.parquet").to_pandas()
    if "candidate" in samples and len(samples) and not (
            0 < samples["candidate"].min() and samples["candidate"].max() < meta["vocab_size"]):
        raise InputError(f"candidate ids outside 1..{meta['vocab_size'] - 1}",
                         file=str(path / "samples.parquet"), key="candidate")
    return Dataset(path=path, meta=meta, arrays=arrays, samples=samples)


def select_samples(ds: Dataset, split: str, max_len: int,
                   loss_positions: str = "last") -> pd.DataFrame:
    """Sample rows for one split.

    valid/test: every row. train + "last": every row (loss on the target only). train + "all":
    only window ends, (last train prefix - prefix_len) % max_len == 0, so the windows tile each
    user's training part back from its last train target and every train interaction is in
    exactly one window (the model puts a loss on every position).
    """
    _check_args(split, max_len, loss_positions, ds)
    loss_positions = resolve_loss_positions(ds, loss_positions)
    s = ds.samples
    keep = _selection_mask(s["split"].to_numpy(), s["prefix_len"].to_numpy(),
                           s["user_len"].to_numpy(), split, max_len, loss_positions)
    return s[keep].reset_index(drop=True)


def _selection_mask(split_col: np.ndarray, prefix: np.ndarray, user_len: np.ndarray,
                    split: str, max_len: int, loss_positions: str) -> np.ndarray:
    keep = split_col == split
    if split == "train" and loss_positions == "all":
        keep &= (last_train_prefix(user_len) - prefix) % max_len == 0
    return keep


def _select_rows(batch: dict[str, np.ndarray], split: str, max_len: int,
                 loss_positions: str) -> dict[str, np.ndarray]:
    """Ray map_batches form of `select_samples` (same rule, on a numpy batch)."""
    keep = _selection_mask(batch["split"].astype(str), batch["prefix_len"], batch["user_len"],
                           split, max_len, loss_positions)
    return {k: batch[k][keep] for k in _SAMPLE_COLUMNS if k in batch}


# What a selected sample row carries into `collate`; candidate and label only where named.
_SAMPLE_COLUMNS = ("user", "prefix_len", "candidate", "label")


def collate(data: Dataset | UserArrays, user_ids, prefix_lens, max_len: int,
            candidates=None, labels=None) -> dict[str, torch.Tensor]:
    """Windows for (user, prefix_len) pairs as a left-padded batch of int64 tensors.

    With `candidates` (and their `labels`), the last column holds them instead of the
    interaction at prefix_len, which may then be the user's length (a candidate after the
    whole history)."""
    arrays = data.arrays if isinstance(data, Dataset) else data
    user = np.array(user_ids, dtype=np.int64)  # a copy: Ray hands read-only arrays
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    user_len = arrays.offsets[user + 1] - arrays.offsets[user]
    last_ok = prefix <= user_len if candidates is not None else prefix < user_len
    if np.any((prefix < 0) | ~last_ok):
        raise ValueError("prefix_len outside its user's sequence")  # would read another user
    start = np.maximum(prefix - max_len + 1, 0)
    lengths = prefix - start + 1
    width = int(lengths.max()) if len(lengths) else 0
    col = np.arange(width)[None, :] - (width - lengths)[:, None]  # index inside the window
    real = col >= 0
    flat = np.where(real, arrays.offsets[user][:, None] + start[:, None] + col, 0)
    flat = np.minimum(flat, max(len(arrays.items) - 1, 0))  # a candidate's slot: set below
    items = np.where(real, arrays.items[flat], 0).astype(np.int64)
    window_labels = np.where(real, arrays.labels[flat], 0).astype(np.int64)
    if candidates is not None and width:
        items[:, -1] = np.asarray(candidates, dtype=np.int64)
        window_labels[:, -1] = np.asarray(labels, dtype=np.int64)
    return {
        "items": torch.from_numpy(items),
        "labels": torch.from_numpy(window_labels),
        "lengths": torch.from_numpy(lengths),
        "user": torch.from_numpy(user),
    }


def collate_rows(arrays: UserArrays, rows, max_len: int) -> dict[str, torch.Tensor]:
    """`collate` for selected sample rows (a DataFrame or a dict of arrays)."""
    named = "candidate" in rows
    return collate(arrays, rows["user"], rows["prefix_len"], max_len,
                   rows["candidate"] if named else None, rows["label"] if named else None)


def local_batches(ds: Dataset, split: str, batch_size: int, max_len: int,
                  loss_positions: str = "last", shuffle: bool = False, seed: int = 0,
                  drop_last: bool = False, negatives: str = "fixed", packed: bool = False
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in plain Python; shuffled, seeded; with a loss on the target only, grouped by
    window length; `packed` (evaluation): see `packed_batches`.

    A batch is padded to its longest window, so on sparse data (most histories a few items
    long, a few hundreds) random batches cost nearly the full max_len each. With
    `loss_positions: last` shuffling therefore draws a seeded permutation, sorts each run of
    `GROUP_BATCHES` batches' worth of samples by window length, cuts it into batches and
    shuffles the batch order: every sample once per pass, batches of similar lengths, a
    different mix each seed (the "group by length" sampler of NLP trainers). Each window has
    one target there, so the batch mean weighs every target alike either way. Not with a loss
    on every position: its batch mean is over the batch's real positions, and batches of only
    short windows would weigh their few targets as much as a batch of full ones (measured:
    two methods of the synthetic amazon profile fell below 0.6 test AUC).

    `negatives` "fresh" (or "auto" on a dataset that drew its own): every negative candidate
    redrawn for this pass (`redraw_negatives`, seeded by `seed`)."""
    loss_positions = resolve_loss_positions(ds, loss_positions)
    rows = select_samples(ds, split, max_len, loss_positions)
    columns = {k: rows[k].to_numpy() for k in _SAMPLE_COLUMNS if k in rows}
    if resolve_train_negatives(ds, negatives) == "fresh":
        columns["candidate"] = redraw_negatives(
            ds.arrays, ds.meta["vocab_size"], columns["user"], columns["candidate"],
            columns["label"], np.random.default_rng([seed, _REDRAW_STREAM]))
    if packed:
        batches = packed_batches(np.minimum(columns["prefix_len"] + 1, max_len), batch_size,
                                 max_len)
    elif shuffle and loss_positions == "last":
        batches = _length_grouped(np.minimum(columns["prefix_len"], max_len), batch_size,
                                  np.random.default_rng(seed), drop_last)
    else:
        order = (np.random.default_rng(seed).permutation(len(rows)) if shuffle
                 else np.arange(len(rows)))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        batches = [order[lo:lo + batch_size] for lo in range(0, stop, batch_size)]
    for take in batches:
        yield collate_rows(ds.arrays, {k: v[take] for k, v in columns.items()}, max_len)


GROUP_BATCHES = 50  # batches per length-sorted run of a shuffled pass
PACKED_MAX_ROWS = 2048  # windows per packed evaluation batch, at most
_REDRAW_STREAM = 1  # a negatives draw's seed is (seed, this): not the shuffle's stream


def packed_batches(widths: np.ndarray, batch_size: int, max_len: int) -> list[np.ndarray]:
    """Row indices per evaluation batch: rows sorted by window width, and a batch of windows
    of width w (interactions) holds batch_size * (max_len / w)^2 of them (at most
    PACKED_MAX_ROWS), so its attention scores take the memory of batch_size full windows.

    A batch is padded to its longest window, and the evaluation batch size is sized for full
    windows: on sparse data (Amazon Toys: 2.2 evaluation samples per user, most histories a few
    items) batches of 16 mostly short windows paid their per-batch overhead 2,674 times per
    split. Every row once; the metrics do not depend on the order (equal up to rounding)."""
    order = np.argsort(widths, kind="stable")
    w = widths[order]
    batches, lo = [], 0
    while lo < len(order):
        # sorted ascending: a batch's widest window is its last; grow while it fits
        hi = lo + batch_size
        while hi < len(order) and hi - lo < PACKED_MAX_ROWS and \
                (hi + 1 - lo) * w[hi] ** 2 <= batch_size * max_len ** 2:
            hi += 1
        batches.append(order[lo:hi])
        lo = hi
    return batches


def resolve_train_negatives(ds: Dataset, negatives: str) -> str:
    """"auto" -> "fresh" where the dataset drew its negatives itself (meta "negatives":
    "uniform", e.g. `prepare sequences`), else "fixed"; "fresh" needs such a dataset."""
    if negatives not in TRAIN_NEGATIVES:
        raise InputError(f"must be one of {TRAIN_NEGATIVES}, got {negatives!r}",
                         key="train_negatives")
    drawn = ds.meta.get("negatives") == "uniform"
    if negatives == "fresh" and not drawn:
        raise InputError(f"dataset {ds.meta['name']!r} has no negatives drawn by a known "
                         "sampler (they are logged, or there are none): they cannot be "
                         "redrawn; use fixed", key="train_negatives")
    if negatives == "auto":
        return "fresh" if drawn else "fixed"
    return negatives


def touched_keys(arrays: UserArrays, vocab_size: int) -> np.ndarray:
    """Sorted user * vocab_size + item keys of every interaction (what each user touched)."""
    users = np.repeat(np.arange(len(arrays.offsets) - 1), np.diff(arrays.offsets))
    return np.sort(users * vocab_size + arrays.items.astype(np.int64))


def redraw_negatives(arrays: UserArrays, vocab_size: int, user, candidate, label,
                     rng: np.random.Generator, keys: np.ndarray | None = None) -> np.ndarray:
    """`candidate` with every negative (label 0) replaced by an item drawn uniformly from the
    items its user never touched: the sampler that drew them at prepare time
    (sources/sequences.py), drawn again, so that no pass sees the negatives of another and a
    model cannot memorise them (with fixed ones, Amazon Toys' validation AUC fell at the
    start of every pass; docs/training.md). A negative still touched after the last round
    keeps its prepared item. Positives are never changed."""
    keys = touched_keys(arrays, vocab_size) if keys is None else keys
    out = np.array(candidate, dtype=np.int64)
    neg = np.flatnonzero(np.asarray(label) == 0)
    if not len(keys) or not len(neg):
        return out
    drawn, left = draw_untouched(np.asarray(user, dtype=np.int64)[neg], keys, vocab_size,
                                 np.arange(1, vocab_size), rng)
    drawn[left] = out[neg[left]]  # still touched after every round: the prepared item
    out[neg] = drawn
    return out


def _length_grouped(widths: np.ndarray, batch_size: int, rng: np.random.Generator,
                    drop_last: bool) -> list[np.ndarray]:
    """Row indices per batch: a permutation, length-sorted in runs, batch order shuffled."""
    order = rng.permutation(len(widths))
    run = GROUP_BATCHES * batch_size
    batches = []
    for lo in range(0, len(order), run):
        part = order[lo:lo + run]
        part = part[np.argsort(widths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in rng.permutation(len(batches))]


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray (listening on 127.0.0.1 only) if none is running; join the cluster
    when RAY_ADDRESS is set (a cluster decides its own resources)."""
    from malloc_ray.ray_local import ensure_ray as _ensure_ray

    _ensure_ray(num_cpus=num_cpus)


def ray_samples(ds: Dataset, split: str | None = None, max_len: int | None = None,
                loss_positions: str = "last"):
    """Sample rows as a Ray Dataset: the whole table, or with `split` the selected (user,
    prefix_len) rows. A study driver materializes the selected rows once and hands them to
    trials, which then read them without launching Ray tasks of their own (tasks inside
    trials can deadlock when the trials hold every CPU)."""
    import ray.data

    ensure_ray()
    if split is None:
        return ray.data.from_pandas(ds.samples)
    rows = select_samples(ds, split, max_len, loss_positions)
    return ray.data.from_pandas(rows[[k for k in _SAMPLE_COLUMNS if k in rows]])


def ray_batches(ds: Dataset, split: str, batch_size: int, max_len: int,
                loss_positions: str = "last", shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, samples=None, device: str = "cpu",
                negatives: str = "fixed") -> Iterator[dict[str, torch.Tensor]]:
    """The same batches as `local_batches`, fed by Ray Data.

    `samples` (default: `ray_samples(ds)`) is a ray.data.Dataset holding either the whole
    samples table, which is filtered to `split` / `loss_positions` here, or rows already
    selected by `ray_samples(ds, split, ...)` (no `split` column), which are read as they are;
    or a DataIterator shard (`streaming_split`, `ray.train.get_dataset_shard`) of selected rows,
    read as it comes (shuffle before splitting). Shuffling is Ray's seeded local shuffle
    buffer, which runs in this process rather than as cluster tasks. `ds` always supplies
    the sequences. Fresh negatives (`negatives`, as in `local_batches`) are redrawn batch by
    batch, seeded by `seed` and the batch's rows (so the draw does not depend on which thread
    collates which batch).
    """
    import ray.data

    _check_args(split, max_len, loss_positions, ds)
    loss_positions = resolve_loss_positions(ds, loss_positions)
    ensure_ray()
    _quiet_and_ordered(ray.data.DataContext.get_current())
    if samples is None:
        samples = ray_samples(ds)
    shuffle_args = {}
    if isinstance(samples, ray.data.Dataset):
        if "split" in samples.schema().names:
            samples = samples.map_batches(_select_rows, batch_format="numpy", fn_kwargs=dict(
                split=split, max_len=max_len, loss_positions=loss_positions))
        if shuffle:
            shuffle_args = {"local_shuffle_buffer_size": max(batch_size, 100_000),
                            "local_shuffle_seed": seed}
        _quiet_and_ordered(samples.context)  # a dataset made elsewhere has its own context
    elif shuffle:
        raise InputError("cannot shuffle a DataIterator shard; shuffle the dataset before "
                         "splitting it", key="shuffle")
    fresh = None
    if resolve_train_negatives(ds, negatives) == "fresh":
        fresh = (ds.meta["vocab_size"], seed, touched_keys(ds.arrays, ds.meta["vocab_size"]))
    return samples.iter_torch_batches(batch_size=batch_size, drop_last=drop_last,
                                      collate_fn=_window_collate_class()(ds.arrays, max_len,
                                                                         fresh),
                                      device=device, **shuffle_args)


def _quiet_and_ordered(context) -> None:
    """No progress bars in trial logs; a deterministic order (also of a seeded shuffle)."""
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True


def resolve_loss_positions(ds: Dataset, loss_positions: str) -> str:
    """"auto" -> "last" for a dataset scoring explicit candidates, else "all"; others as given."""
    if loss_positions == "auto":
        return "last" if ds.has_candidates else "all"
    return loss_positions


def _check_args(split: str, max_len: int, loss_positions: str, ds: Dataset) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})",
                         key="split")
    if max_len < 2:
        raise InputError(f"max_len must be >= 2 (history + target), got {max_len}",
                         key="max_len")
    if loss_positions not in LOSS_POSITIONS:
        raise InputError(f"loss_positions must be one of {', '.join(LOSS_POSITIONS)}, got "
                         f"{loss_positions!r}", key="loss_positions")
    if ds.has_candidates and loss_positions == "all":
        # The history holds interactions only (no negatives), so a loss on every position
        # would train on positives alone.
        raise InputError(f"dataset {ds.meta['name']!r} scores explicit candidates: only the "
                         "last position of a window has a negative or positive to learn from; "
                         "set loss_positions: last", key="loss_positions")


@lru_cache(maxsize=1)
def _window_collate_class() -> type:
    """Built on first use so that importing this module does not import Ray Data (~1.5 s)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class WindowCollate(NumpyBatchCollateFn):
        """Numpy batch of sample rows -> `collate` (Ray 2.60 deprecates plain functions)."""

        def __init__(self, arrays: UserArrays, max_len: int, fresh=None):
            super().__init__()
            self.arrays, self.max_len, self.fresh = arrays, max_len, fresh

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            if self.fresh is not None:
                vocab, seed, keys = self.fresh
                rows = zlib.crc32(np.ascontiguousarray(batch["user"], dtype=np.int64).tobytes()
                                  + np.ascontiguousarray(batch["prefix_len"],
                                                         dtype=np.int64).tobytes())
                batch = {**batch, "candidate": redraw_negatives(
                    self.arrays, vocab, batch["user"], batch["candidate"], batch["label"],
                    np.random.default_rng([seed, _REDRAW_STREAM, rows]), keys)}
            return collate_rows(self.arrays, batch, self.max_len)

    return WindowCollate
