"""reczoo's BARS `_x1` CSVs (KuaiVideo, MicroVideo1.7M, AmazonElectronics) -> InteractionLog.

Layouts and quirks: docs/data.md ("reczoo datasets"). Every x1 row is one impression and each
user's impressions are spread over train.csv and test.csv, so a user's whole chronological
sequence is rebuilt from all of that user's rows (the history columns repeat at most 100 earlier
ids per row; KuaiVideo even keeps the *earliest* 100, so they cannot give the sequence).
AmazonElectronics has no timestamp: there the history column fixes the order instead.

Modules by job: reczoo_files.py finds the files (and `SourceLog` names a row's file),
reczoo_csv.py reads and validates the CSV blocks, progress.py draws the progress bar, and
amazon_x1.py rebuilds AmazonElectronics' sequences. This module holds the layouts and readers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from malloc_ray.data.sources.amazon_x1 import Longest, amazon_sequences
from malloc_ray.data.sources.progress import Progress
from malloc_ray.data.sources.reczoo_csv import Layout, read_x1
from malloc_ray.data.sources.reczoo_files import X1_FILES, SourceLog, describe_files, x1_files
from malloc_ray.errors import InputError

__all__ = ["AMAZON", "KUAIVIDEO", "MICROVIDEO", "X1_FILES", "Layout", "Progress", "SourceLog",
           "read_amazon_x1", "read_columns", "read_kuaivideo_x1", "read_microvideo_x1"]

KUAIVIDEO = Layout("KuaiVideo_x1", ids=("timestamp", "user_id", "item_id"),
                   labels=("is_click", "is_like", "is_follow"),
                   lists=(("pos_items",), ("neg_items",)), time="timestamp")
MICROVIDEO = Layout("MicroVideo1.7M_x1", ids=("user_id", "item_id", "cate_id", "timestamp"),
                    labels=("is_click",), lists=(("clicked_items", "clicked_categories"),),
                    time="timestamp")
AMAZON = Layout("AmazonElectronics_x1", ids=("user_id", "item_id", "cate_id"),
                labels=("label",), lists=(("item_history", "cate_history"),))


# -- public readers ------------------------------------------------------------------------
def read_kuaivideo_x1(path: str | Path, *, files: list[str] | tuple[str, ...] = X1_FILES,
                      progress: Progress | None = None) -> SourceLog:
    """KuaiVideo_x1: label is_click, time `timestamp` (anonymised, order-preserving)."""
    return _timed_log(KUAIVIDEO, path, files, progress)


def read_microvideo_x1(path: str | Path, *, files: list[str] | tuple[str, ...] = X1_FILES,
                       progress: Progress | None = None) -> SourceLog:
    """MicroVideo1.7M_x1: label is_click, time `timestamp` (unix seconds; ties keep file order,
    so train rows stay before test rows of the same second)."""
    return _timed_log(MICROVIDEO, path, files, progress)


def read_amazon_x1(path: str | Path, *, files: list[str] | tuple[str, ...] = X1_FILES,
                   progress: Progress | None = None) -> SourceLog:
    """AmazonElectronics_x1 (DIN's rows, shuffled, no timestamp), rebuilt per user as the
    history r0, r1, ..., r_k plus candidate-only negatives:

    r = the user's reviews (label 1): the longest `item_history` among the user's rows plus
    that row's item when it is a positive; n_i = the sampled negative row(s) whose history has
    i reviews (label 0). A negative is a candidate that was shown and not clicked: it is scored
    after r_0..r_(i-1), beside r_i, and never enters the history (interleaving it as
    r0, n1, r1, n2, ... makes the label stream alternate, which HSTU reads off: docs/data.md,
    "Label-stream audit"). Time is the step i. Every positive row must agree with r
    (r_i == its item): a check that the rows really share one history.
    """
    found = x1_files(path, files)
    rows, longest = _Rows(found), Longest()
    for batch in read_x1(AMAZON, found, progress):
        first = rows.count
        rows.add(batch.file, batch.ints["user_id"], batch.ints["item_id"],
                 batch.ints["label"].astype(np.int8), batch.tokens["item_history"])
        longest.add(batch, first)
    log = SourceLog(*rows.arrays(), file=describe_files(found), parts=rows.parts())
    return amazon_sequences(log, longest)


def read_columns(path: str | Path, layout: Layout, *,
                 files: list[str] | tuple[str, ...] = X1_FILES) -> dict[str, np.ndarray]:
    """Any FuxiCTR-style CSV layout through the x1 reading path: the int and label columns,
    plus `<list>.tokens` (ids per '^'-list), all files concatenated; errors name file and line."""
    found = x1_files(path, files)
    layout = dataclasses.replace(layout, token_counts=True)
    parts = [{**batch.ints, **{f"{c}.tokens": t for c, t in batch.tokens.items()}}
             for batch in read_x1(layout, found, None)]
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# -- rows of several files -----------------------------------------------------------------
def _timed_log(layout: Layout, path, files, progress) -> SourceLog:
    found = x1_files(path, files)
    rows = _Rows(found)
    for batch in read_x1(layout, found, progress):
        rows.add(batch.file, batch.ints["user_id"], batch.ints["item_id"],
                 batch.ints[layout.labels[0]].astype(np.int8), batch.ints[layout.time])
    return SourceLog(*rows.arrays(), file=describe_files(found), parts=rows.parts())


class _Rows:
    """Per-batch numpy columns, concatenated once at the end; counts rows per file."""

    def __init__(self, files: list[Path]):
        self.per_file = {str(f): 0 for f in files}
        self.cols: list[tuple[np.ndarray, ...]] = []
        self.count = 0

    def add(self, file: str, *cols: np.ndarray) -> None:
        self.cols.append(cols)
        self.count += len(cols[0])
        self.per_file[file] += len(cols[0])

    def arrays(self) -> tuple[np.ndarray, ...]:
        if not self.count:
            raise InputError("no data rows", file=", ".join(self.per_file))
        return tuple(np.concatenate(c) for c in zip(*self.cols))

    def parts(self) -> tuple[tuple[str, int], ...]:
        return tuple(self.per_file.items())
