"""Generic interaction log reader: one row per (user, item, timestamp, label-or-rating).

CSV/TSV (by extension) or parquet. Every bad value raises `InputError` naming the file and the
1-based *data* row: the CSV header is not counted, so data row N is file line N + 1 (the
message shows both). Validation is vectorised per record batch with pyarrow compute.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from malloc_ray.errors import InputError
from malloc_ray.files import first_line

_INT_RE = r"^\s*\d+\s*$"
INT64_MAX = 2**63 - 1  # ids and timestamps are int64: digits beyond it are errors, not overflows
_NEG_INT_RE = r"^\s*-\d+\s*$"
_NUM_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_LABEL_RE = r"^\s*[01](\.0*)?\s*$"
_BATCH_ROWS = 1 << 20  # parquet rows per validated batch
_CSV_BLOCK_BYTES = 16 << 20  # CSV bytes per validated batch


@dataclass
class InteractionLog:
    """Raw interactions in file order, ids still the source's own (non-negative integers).

    `file` is the path shown in error messages; row i of the arrays is data row i + 1 there.
    `sort_key` orders interactions in time when timestamps have fractions (else None: use ts).
    `candidate` marks rows that are scored as candidates only and never enter the history (a
    negative shown beside the interaction that follows it, as DIN's negatives are); None: none.
    Such a row is scored after every history row that sorts before it (docs/data.md).
    `negatives` names how the candidate-only negatives were made when a reader drew them
    itself: "uniform" (each from the items its user never touched, uniformly), which training
    may redraw every pass (TrialConfig.train_negatives); None: logged, kept as they are.
    """

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    label: np.ndarray  # int8, 0/1
    ts: np.ndarray  # int64
    file: str | None = None
    sort_key: np.ndarray | None = None
    candidate: np.ndarray | None = None  # bool
    negatives: str | None = None

    def __len__(self) -> int:
        return len(self.user)


def read_log(path: str | Path, *, user_col: str = "user", item_col: str = "item",
             time_col: str = "timestamp", label_col: str | None = "label",
             rating_col: str | None = None, rating_threshold: float | None = None,
             delimiter: str | None = None) -> InteractionLog:
    """Read and validate an interaction log.

    The label is `label_col` (values 0/1) unless `rating_col` is given, in which case
    label = rating >= rating_threshold. Format follows the extension: .parquet/.pq, .tsv/.inter
    (tab) or anything else as CSV (comma) unless `delimiter` is given.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    if rating_col is not None:
        if rating_threshold is None:
            raise InputError("rating_col needs a rating_threshold", key="rating_threshold")
        value_col = rating_col
    elif label_col is not None:
        value_col = label_col
    else:
        raise InputError("give label_col or rating_col", key="label_col")
    columns = [user_col, item_col, time_col, value_col]
    parts = []
    for row0, batch in _batches(path, columns, delimiter):
        parts.append(_convert(batch, columns, rating_col is not None, rating_threshold,
                              str(path), row0))
    if not parts or sum(len(p[0]) for p in parts) == 0:
        raise InputError("no interactions in file", file=str(path))
    user, item, label, ts, key = (np.concatenate(cols) for cols in zip(*parts))
    fractional = bool(np.any(key != ts))
    return InteractionLog(user, item, label, ts, file=str(path),
                          sort_key=key if fractional else None)


def _batches(path: Path, columns: list[str], delimiter: str | None
             ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield (1-based data row of the batch's first row, batch of string columns)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        yield from _parquet_batches(path, columns)
    else:
        if delimiter is None:
            delimiter = "\t" if path.suffix.lower() in (".tsv", ".inter") else ","
        yield from csv_batches(path, columns, delimiter)


def _parquet_batches(path: Path, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable parquet file ({exc})", file=str(path)) from exc
    _require_columns(pfile.schema_arrow.names, columns, path)
    row0 = 1
    try:  # a corrupt page fails the read of its batch
        for batch in pfile.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            # One validation path for every input type: typed columns become their text form.
            batch = pa.RecordBatch.from_arrays(
                [_as_text(batch.column(c), c, path, row0) for c in columns], names=columns)
            yield row0, batch
            row0 += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"corrupt parquet data at or after this row ({first_line(exc)})",
                         file=str(path), row=row0) from exc


def _as_text(arr: pa.Array, col: str, path: Path, row0: int) -> pa.Array:
    if pa.types.is_boolean(arr.type):  # a bool label column reads as 0/1
        arr = pc.cast(arr, pa.int8())
    try:
        return pc.cast(arr, pa.string())
    except pa.ArrowNotImplementedError as exc:
        raise InputError(f"column {col!r} has type {arr.type}, expected numbers or text",
                         file=str(path), key=col) from exc
    except pa.ArrowInvalid as exc:  # binary that is not UTF-8 text
        i = next(i for i, v in enumerate(arr.to_pylist()) if not _utf8(v))
        raise InputError(f"value in column {col!r} is not UTF-8 text: {arr[i].as_py()!r}",
                         file=str(path), row=row0 + i) from exc


def _utf8(value: bytes | None) -> bool:
    try:
        value is None or value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def csv_batches(path: Path, columns: list[str], delimiter: str
                ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield (1-based data row, batch of text columns), single-threaded so that a malformed
    row raises naming its physical line (also the reczoo readers' slow pass)."""
    header = read_header(path, delimiter)
    _require_columns(header, columns, path)
    bad_lines: list[tuple[int, int, int]] = []

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        bad_lines.append((row.number, row.expected_columns, row.actual_columns))
        return "error"

    # Single-threaded parsing is what makes pyarrow report the physical line of a bad row;
    # empty lines are kept so that row numbers match the file (an empty line is malformed).
    read_options = pacsv.ReadOptions(use_threads=False, column_names=header, skip_rows=1,
                                     block_size=_CSV_BLOCK_BYTES)
    parse_options = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                                       invalid_row_handler=on_invalid_row)
    convert_options = pacsv.ConvertOptions(include_columns=columns,
                                           column_types={c: pa.string() for c in columns})
    row0 = 1
    try:  # open_csv parses the first block already, so it can fail like the reads
        reader = pacsv.open_csv(path, read_options=read_options, parse_options=parse_options,
                                convert_options=convert_options)
        for batch in reader:
            yield row0, batch
            row0 += batch.num_rows
    except pa.ArrowInvalid as exc:
        if bad_lines:
            line, expected, actual = bad_lines[0]
            raise InputError(f"malformed row (file line {line}): expected {expected} columns, "
                             f"got {actual}", file=str(path), row=line - 1) from exc
        line = _first_non_utf8_line(path)
        if line is not None:
            raise InputError(f"not UTF-8 text (file line {line})", file=str(path),
                             row=line - 1) from exc
        raise InputError(f"unreadable CSV ({first_line(exc)})", file=str(path)) from exc


def _first_non_utf8_line(path: Path) -> int | None:
    """1-based file line of the first bytes that are not UTF-8 (pyarrow names no line)."""
    with open(path, "rb") as fh:
        return next((n for n, line in enumerate(fh, 1) if not _utf8(line)), None)


def read_header(path: Path, delimiter: str) -> list[str]:
    """Column names from the first line (read here so every column can be typed as text)."""
    with open(path, "rb") as fh:
        first = fh.readline()  # only this line: bad bytes further on are the reader's to place
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"header row is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         file=str(path)) from exc
    header = next(csv.reader([text], delimiter=delimiter), [])
    if not header:
        raise InputError("empty file (no header row)", file=str(path))
    return header


def _require_columns(present: list[str], needed: list[str], path: Path) -> None:
    for col in needed:
        if col not in present:
            raise InputError(f"column {col!r} not found (columns: {', '.join(present)})",
                             file=str(path), key=col)


def _convert(batch: pa.RecordBatch, columns: list[str], is_rating: bool,
             threshold: float | None, file: str, row0: int):
    user_col, item_col, time_col, value_col = columns
    for col in columns:
        _check_present(batch.column(col), col, file, row0)
    user = _ids(batch.column(user_col), "user", user_col, file, row0)
    item = _ids(batch.column(item_col), "item", item_col, file, row0)
    ts, key = _timestamps(batch.column(time_col), time_col, file, row0)
    values = batch.column(value_col)
    if is_rating:
        _check_regex(values, _NUM_RE, f"non-numeric rating in column {value_col!r}", file, row0)
        label = (_floats(values) >= threshold).astype(np.int8)
    else:
        _check_regex(values, _LABEL_RE, f"label in column {value_col!r} is not 0 or 1",
                     file, row0)
        label = _floats(values).astype(np.int8)
    return user, item, label, ts, key


def _check_present(arr: pa.Array, col: str, file: str, row0: int) -> None:
    missing = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_trim_whitespace(arr), ""))
    _raise_first(missing, f"missing value in column {col!r}", arr, file, row0)


def _ids(arr: pa.Array, what: str, col: str, file: str, row0: int) -> np.ndarray:
    negative = pc.match_substring_regex(arr, _NEG_INT_RE)
    _raise_first(negative, f"negative {what} id in column {col!r}", arr, file, row0)
    _check_regex(arr, _INT_RE, f"non-integer {what} id in column {col!r}", file, row0)
    return _int64(arr, f"{what} id in column {col!r}", file, row0)


def _int64(arr: pa.Array, what: str, file: str, row0: int) -> np.ndarray:
    """Digit strings as int64, up to INT64_MAX (19 digits); a larger one is an error."""
    digits = pc.utf8_trim_whitespace(arr)
    if (pc.max(pc.utf8_length(digits)).as_py() or 0) < 19:  # usual: nothing can overflow
        return pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)
    digits = pc.replace_substring_regex(digits, r"^0+(\d)", r"\1")
    length = pc.utf8_length(digits)
    big = pc.or_(pc.greater(length, 19),
                 pc.and_(pc.equal(length, 19), pc.greater(digits, str(INT64_MAX))))
    _raise_first(big, f"{what} is beyond the int64 maximum {INT64_MAX}", arr, file, row0)
    return pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)


def _timestamps(arr: pa.Array, col: str, file: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (int64 timestamps, sort key). Integer text stays exact even beyond 2**53."""
    _check_regex(arr, _NUM_RE, f"non-numeric timestamp in column {col!r}", file, row0)
    if pc.all(pc.match_substring_regex(arr, _INT_RE)).as_py():
        ts = _int64(arr, f"timestamp in column {col!r}", file, row0)
        return ts, ts
    key = _floats(arr)
    outside = ~((key >= -2.0**63) & (key < 2.0**63))  # inf too: 1e400 reads as inf
    _raise_first(pa.array(outside), f"timestamp in column {col!r} is outside the int64 range",
                 arr, file, row0)
    return np.floor(key).astype(np.int64), key


def _floats(arr: pa.Array) -> np.ndarray:
    return pc.cast(pc.utf8_trim_whitespace(arr), pa.float64()).to_numpy(zero_copy_only=False)


def _check_regex(arr: pa.Array, pattern: str, message: str, file: str, row0: int) -> None:
    _raise_first(pc.invert(pc.match_substring_regex(arr, pattern)), message, arr, file, row0)


def _raise_first(bad: pa.Array, message: str, arr: pa.Array, file: str, row0: int) -> None:
    if not pc.any(bad).as_py():
        return
    i = int(pc.index(bad, True).as_py())
    value = arr[i].as_py()
    raise InputError(f"{message}: {value!r}", file=file, row=row0 + i)
