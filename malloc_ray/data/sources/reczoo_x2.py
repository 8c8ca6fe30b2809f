"""The LongCTR `_x2` parquet layout (reczoo KuaiVideo_x2, MicroVideo1.7M_x2) -> InteractionLog.

    train.parquet valid.parquet test.parquet   one impression per row: user_index, item_index,
                                               seq_len, is_click
    user_info.parquet                          full_item_seq: one list per user, row = user_index

A row's history is `full_item_seq[user_index][:seq_len]`, so `seq_len` is the row's position in
the user's behaviour stream. The rebuilt sequence is the user's impression rows ordered by it;
a click at seq_len s is what makes the next rows' seq_len s + 1, so at equal seq_len the
non-clicks come first, then the click, and otherwise file order. Items keep LongCTR's
`item_index` as their raw id. docs/data.md says what is not carried over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from malloc_ray.data.sources.progress import ByteProgress, Progress
from malloc_ray.data.sources.reczoo_files import SourceLog, dataset_files
from malloc_ray.errors import InputError

X2_FILES = ("train.parquet", "valid.parquet", "test.parquet")
X2_COLUMNS = ("user_index", "item_index", "seq_len")
_BATCH_ROWS = 1 << 20


def read_longctr_x2(path: str | Path, *, files: list[str] | tuple[str, ...] = X2_FILES,
                    label: str = "is_click", progress: Progress | None = None) -> SourceLog:
    """Read a LongCTR x2 directory: the impression files `files` plus user_info.parquet."""
    root = Path(path)
    if not root.is_dir():
        raise InputError("not a directory (expected a LongCTR x2 dataset directory)",
                         file=str(root))
    seq_lens = _user_seq_lengths(root / "user_info.parquet")
    found = dataset_files(root, files)
    bar = ByteProgress("LongCTR_x2", sum(f.stat().st_size for f in found), progress)
    cols, parts = [], []
    try:
        for file in found:
            rows = 0
            for row0, batch, nbytes in _batches(file, label):
                cols.append(_validate(batch, label, seq_lens, str(file), row0))
                rows += batch.num_rows
                bar.advance(nbytes, batch.num_rows)
            parts.append((str(file), rows))
    except BaseException:
        bar.abandon()
        raise
    bar.close()
    user, item, click, seq_len = (np.concatenate(c) for c in zip(*cols))
    return SourceLog(user, item, click, seq_len, sort_key=2 * seq_len + click,
                     file=str(root), parts=tuple(parts))


def _user_seq_lengths(file: Path) -> np.ndarray:
    if not file.is_file():
        raise InputError("no such file (LongCTR x2 needs user_info.parquet)", file=str(file))
    try:
        table = pq.read_table(file, columns=["full_item_seq"])
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise InputError(f"cannot read column 'full_item_seq' ({exc})", file=str(file),
                         key="full_item_seq") from exc
    lengths = pc.list_value_length(table.column("full_item_seq"))
    return pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _batches(file: Path, label: str):
    try:
        pfile = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable parquet file ({exc})", file=str(file)) from exc
    columns = [*X2_COLUMNS, label]
    for col in columns:
        if col not in pfile.schema_arrow.names:
            raise InputError(f"column {col!r} not found (columns: "
                             f"{', '.join(pfile.schema_arrow.names)})", file=str(file), key=col)
    # A batch stands for its rows' share of the file's bytes (cumulative, so the shares add
    # up to the file's size exactly).
    size, total_rows = file.stat().st_size, max(pfile.metadata.num_rows, 1)
    row0 = done = 0
    for batch in pfile.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        upto = size * min(row0 + batch.num_rows, total_rows) // total_rows
        yield row0 + 1, batch, upto - done
        row0, done = row0 + batch.num_rows, upto


def _validate(batch: pa.RecordBatch, label: str, seq_lens: np.ndarray, file: str, row0: int):
    values = {col: _ints(batch.column(col), col, file, row0) for col in (*X2_COLUMNS, label)}
    user, item, seq_len, click = (values[c] for c in (*X2_COLUMNS, label))
    checks = [
        ((user < 0) | (user >= len(seq_lens)), "user_index",
         f"user_index outside user_info.parquet's {len(seq_lens)} users"),
        (item < 1, "item_index", "item_index must be >= 1 (0 is padding)"),
        ((click != 0) & (click != 1), label, "label is not 0 or 1"),
    ]
    for bad, col, message in checks:
        _raise_first(bad, message, values[col], file, row0)
    too_long = (seq_len < 0) | (seq_len > seq_lens[user])
    _raise_first(too_long, "seq_len is negative or longer than the user's full_item_seq",
                 seq_len, file, row0)
    return user, item, click.astype(np.int8), seq_len


def _ints(arr: pa.Array, col: str, file: str, row0: int) -> np.ndarray:
    if arr.null_count:
        _raise_first(pc.is_null(arr).to_numpy(zero_copy_only=False), f"missing value in "
                     f"column {col!r}", np.full(len(arr), None), file, row0)
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise InputError(f"column {col!r} has type {arr.type}, expected integers", file=file,
                         key=col)
    values = arr.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(arr.type):
        _raise_first(values != np.floor(values), f"non-integer value in column {col!r}",
                     values, file, row0)
    return values.astype(np.int64)


def _raise_first(bad: np.ndarray, message: str, values: np.ndarray, file: str, row0: int):
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{message}: {values[i]!r}", file=file, row=row0 + i)
