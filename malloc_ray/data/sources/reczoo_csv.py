"""Reading an x1 CSV layout: the header check and the byte-level validation of every block.

pyarrow parses 16 MB blocks with native int64 conversion on all cores, and only the columns a
sequence needs are kept per block; the '^'-lists are checked with vectorised byte tests on the
raw string buffers. Any value pyarrow cannot convert sends the reader back over the file
single-threaded with text columns, which names the first bad line; well-formed files never pay
for that. Every error names the file and the data row (file line = row + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from malloc_ray.data.sources.interactions import csv_batches, read_header
from malloc_ray.data.sources.progress import ByteProgress, Progress
from malloc_ray.errors import InputError

_BLOCK_BYTES = 16 << 20  # CSV bytes per parsed block (one record batch each)
_CARET = 94  # ord("^")
_INT_TEXT = r"^\d{1,18}$"
_LIST_TEXT = r"^(\d{1,18}(\^\d{1,18})*)?$"


@dataclass(frozen=True)
class Layout:
    """Columns of one x1 CSV layout (read by name, so their order in the file is free)."""

    name: str
    ids: tuple[str, ...]  # non-negative integers
    labels: tuple[str, ...]  # 0/1; the first is the click label
    lists: tuple[tuple[str, ...], ...]  # '^'-joined ids; columns of a group have equal lengths
    time: str | None = None
    token_counts: bool = False  # count ids of every list (pairs are always counted)

    @property
    def columns(self) -> list[str]:
        return [*self.ids, *self.labels, *(c for group in self.lists for c in group)]


@dataclass
class Batch:
    """One validated block of a file: int columns as numpy, list columns as arrow text."""

    file: str
    row0: int  # 1-based data row of the first row
    ints: dict[str, np.ndarray]
    lists: dict[str, pa.Array]
    tokens: dict[str, np.ndarray | None]  # ids per list value (None: not counted)

    def __len__(self) -> int:
        return len(next(iter(self.ints.values())))


def read_x1(layout: Layout, files: list[Path], progress: Progress | None) -> Iterator[Batch]:
    """Validated batches of every file in turn, with a progress bar over their bytes (a
    record batch is one parsed block, so a batch stands for `_BLOCK_BYTES` of its file)."""
    bar = ByteProgress(layout.name, sum(f.stat().st_size for f in files), progress)
    try:
        for file in files:
            _check_header(file, layout)
            size, done = file.stat().st_size, 0
            for batch in _file_batches(file, layout):
                step = min(_BLOCK_BYTES, size - done)
                done += step
                bar.advance(step, len(batch))
                yield batch
            bar.advance(size - done, 0)
    except BaseException:
        bar.abandon()
        raise
    bar.close()


def _check_header(file: Path, layout: Layout) -> None:
    header = read_header(file, ",")
    missing = [c for c in layout.columns if c not in header]
    if missing:
        raise InputError(f"not a {layout.name} CSV: column(s) {', '.join(map(repr, missing))} "
                         f"missing (header: {','.join(header)}; expected "
                         f"{','.join(layout.columns)})", file=str(file), row=None,
                         key=missing[0])


def _file_batches(file: Path, layout: Layout) -> Iterator[Batch]:
    """Fast typed read; on a value pyarrow rejects, locate it with the text-column pass."""
    header = read_header(file, ",")
    types = {c: pa.int64() for c in (*layout.ids, *layout.labels)}
    types.update({c: pa.string() for group in layout.lists for c in group})
    read_options = pacsv.ReadOptions(use_threads=True, column_names=header, skip_rows=1,
                                     block_size=_BLOCK_BYTES)
    parse_options = pacsv.ParseOptions(ignore_empty_lines=False)
    convert_options = pacsv.ConvertOptions(include_columns=layout.columns, column_types=types)
    row0 = 1
    try:
        reader = pacsv.open_csv(file, read_options=read_options, parse_options=parse_options,
                                convert_options=convert_options)
        for record in reader:
            batch = _validate(record, layout, str(file), row0)
            row0 += len(batch)
            yield batch
    except pa.ArrowInvalid as exc:
        _locate_bad_text(file, layout)
        raise InputError(f"unreadable CSV ({exc})", file=str(file)) from exc


def _validate(record: pa.RecordBatch, layout: Layout, file: str, row0: int) -> Batch:
    ints = {}
    for col in (*layout.ids, *layout.labels):
        arr = record.column(col)
        if arr.null_count:
            _fail(f"missing value in column {col!r}", file, row0,
                  int(pc.index(pc.is_null(arr), True).as_py()), "")
        ints[col] = arr.to_numpy()
        bad = ints[col] < 0 if col in layout.ids else (ints[col] != 0) & (ints[col] != 1)
        if bad.any():
            i = int(np.argmax(bad))
            what = "negative id" if col in layout.ids else "label is not 0 or 1"
            _fail(f"{what} in column {col!r}", file, row0, i, ints[col][i])
    lists = {c: record.column(c) for group in layout.lists for c in group}
    counted = {c for group in layout.lists if len(group) > 1 or layout.token_counts
               for c in group}  # counts cost time; only pairs and asked-for ones need them
    tokens = {c: _list_tokens(arr, c, file, row0, c in counted) for c, arr in lists.items()}
    for group in layout.lists:
        for col in group[1:]:
            bad = tokens[col] != tokens[group[0]]
            if bad.any():
                i = int(np.argmax(bad))
                _fail(f"{col!r} has {tokens[col][i]} ids but {group[0]!r} has "
                      f"{tokens[group[0]][i]}", file, row0, i, lists[col][i].as_py())
    return Batch(file, row0, ints, lists, tokens)


def _list_tokens(arr: pa.Array, col: str, file: str, row0: int, count: bool
                 ) -> np.ndarray | None:
    """Check every '^'-joined value's bytes (digits and carets only, no empty token: no
    leading, trailing or doubled caret) on the raw string buffer, the hot loop of a
    KuaiVideo conversion (about 1.2 KB of lists per row). With `count`, ids per value."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
    nonempty = ends > starts
    edge = np.zeros(len(arr), dtype=bool)
    edge[nonempty] = ((data[starts[nonempty]] == _CARET)
                      | (data[ends[nonempty] - 1] == _CARET))
    # uint8 wraps below '0', so "not a digit" is one comparison; '^' is the one allowed
    if (np.count_nonzero((data - 48) > 9) != np.count_nonzero(data == _CARET)
            or edge.any() or _has_double_caret(data)):
        _raise_list_problem(arr, data, ends, edge, col, file, row0)
    if not count:
        return None
    carets = np.flatnonzero(data == _CARET)
    inside = np.searchsorted(carets, ends) - np.searchsorted(carets, starts)
    return (inside + nonempty).astype(np.int64)


def _has_double_caret(data: np.ndarray) -> bool:
    """'^^' anywhere, as two-byte words at even and at odd offsets (fast on big buffers)."""
    pair = _CARET * 257
    even = data[:len(data) // 2 * 2].view(np.uint16)
    odd = data[1:1 + (len(data) - 1) // 2 * 2].view(np.uint16)
    return bool((even == pair).any() or (odd == pair).any())


def _raise_list_problem(arr, data, ends, edge, col, file, row0) -> None:
    """The first bad value of a list column (slow; only runs when there is one)."""
    problems = []
    bad = np.flatnonzero(((data - 48) > 9) & (data != _CARET))
    if len(bad):
        problems.append((_row_of(bad[0], ends), "a character other than a digit or '^'"))
    carets = np.flatnonzero(data == _CARET)
    doubled = np.flatnonzero(np.diff(carets) == 1)
    if len(doubled):
        problems.append((_row_of(carets[doubled[0]], ends), "an empty id ('^^')"))
    if edge.any():
        problems.append((int(np.argmax(edge)), "an empty id (leading or trailing '^')"))
    i, what = min(problems)
    _fail(f"'^'-list in column {col!r} has {what}", file, row0, i, arr[i].as_py())


def _row_of(byte: int, ends: np.ndarray) -> int:
    return int(np.searchsorted(ends, byte, side="right"))


def _fail(message: str, file: str, row0: int, i: int, value) -> None:
    row = row0 + i
    raise InputError(f"{message}: {value!r} (file line {row + 1})", file=file, row=row)


def _locate_bad_text(file: Path, layout: Layout) -> None:
    """Re-read `file` single-threaded as text and raise for the first bad value (or the first
    malformed line, which `csv_batches` reports with its physical line number)."""
    for row0, record in csv_batches(file, layout.columns, ","):
        for col in layout.columns:
            arr = record.column(col)
            is_list = col not in layout.ids and col not in layout.labels
            if not is_list:
                missing = pc.equal(arr, "")
                if pc.any(missing).as_py():
                    _fail(f"missing value in column {col!r}", str(file), row0,
                          int(pc.index(missing, True).as_py()), "")
            pattern = _LIST_TEXT if is_list else (_INT_TEXT if col in layout.ids else r"^[01]$")
            bad = pc.invert(pc.match_substring_regex(arr, pattern))
            if pc.any(bad).as_py():
                i = int(pc.index(bad, True).as_py())
                what = ("a '^'-list of integer ids" if is_list else
                        "an integer id" if col in layout.ids else "a label 0 or 1")
                _fail(f"column {col!r} is not {what}", str(file), row0, i, arr[i].as_py())
