"""reczoo's BARS `_x1` CSVs (KuaiVideo, MicroVideo1.7M, AmazonElectronics) -> InteractionLog.

Layouts and quirks: docs/data.md ("reczoo datasets"). Every x1 row is one impression and each
user's impressions are spread over train.csv and test.csv, so a user's whole chronological
sequence is rebuilt from all of that user's rows (the history columns repeat at most 100 earlier
ids per row; KuaiVideo even keeps the *earliest* 100, so they cannot give the sequence).
AmazonElectronics has no timestamp: there the history column fixes the order instead.

Reading streams: pyarrow parses 16 MB blocks with native int64 conversion on all cores, and
only the columns a sequence needs are kept per block. Any value pyarrow cannot convert sends
the reader back over the file single-threaded with text columns, which names the first bad
line; well-formed files never pay for that.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from malloc_ray.data.sources.interactions import InteractionLog, _csv_batches, read_header
from malloc_ray.errors import InputError

X1_FILES = ("train.csv", "test.csv")  # BARS ships no valid.csv (valid_data is test.csv)
_BLOCK_BYTES = 16 << 20  # CSV bytes per parsed block (one record batch each)
_CARET = 94  # ord("^")
_INT_TEXT = r"^\d{1,18}$"
_LIST_TEXT = r"^(\d{1,18}(\^\d{1,18})*)?$"

Progress = Callable[[str], None]


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


KUAIVIDEO = Layout("KuaiVideo_x1", ids=("timestamp", "user_id", "item_id"),
                   labels=("is_click", "is_like", "is_follow"),
                   lists=(("pos_items",), ("neg_items",)), time="timestamp")
MICROVIDEO = Layout("MicroVideo1.7M_x1", ids=("user_id", "item_id", "cate_id", "timestamp"),
                    labels=("is_click",), lists=(("clicked_items", "clicked_categories"),),
                    time="timestamp")
AMAZON = Layout("AmazonElectronics_x1", ids=("user_id", "item_id", "cate_id"),
                labels=("label",), lists=(("item_history", "cate_history"),))


@dataclass
class SourceLog(InteractionLog):
    """An InteractionLog read from several files: errors about interaction i name the file
    and data row it came from (`origin[i]` is its row counted over all files; None: i)."""

    parts: tuple[tuple[str, int], ...] = ()  # (file, data rows) in reading order
    origin: np.ndarray | None = None

    def locate(self, i: int) -> tuple[str | None, int | None]:
        row = int(i if self.origin is None else self.origin[i])
        for file, rows in self.parts:
            if row < rows:
                return file, row + 1
            row -= rows
        return None, None


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
    found = _x1_files(path, files)
    rows, longest = _Rows(found), _Longest()
    for batch in _read_x1(AMAZON, found, progress):
        first = rows.count
        rows.add(batch.file, batch.ints["user_id"], batch.ints["item_id"],
                 batch.ints["label"].astype(np.int8), batch.tokens["item_history"])
        longest.add(batch, first)
    log = SourceLog(*rows.arrays(), file=_describe(found), parts=rows.parts())
    return amazon_sequences(log, longest)


def read_columns(path: str | Path, layout: Layout, *,
                 files: list[str] | tuple[str, ...] = X1_FILES) -> dict[str, np.ndarray]:
    """Any FuxiCTR-style CSV layout through the x1 reading path: the int and label columns,
    plus `<list>.tokens` (ids per '^'-list), all files concatenated; errors name file and line."""
    found = _x1_files(path, files)
    layout = dataclasses.replace(layout, token_counts=True)
    parts = [{**batch.ints, **{f"{c}.tokens": t for c, t in batch.tokens.items()}}
             for batch in _read_x1(layout, found, None)]
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# -- files -----------------------------------------------------------------------------------
def _x1_files(path: str | Path, files) -> list[Path]:
    """A CSV file as given, or the named files inside a dataset directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError("no such file or directory", file=str(path))
    if not files:
        raise InputError("no files to read", key="files")
    found = [path / name for name in files]
    for file in found:
        if not file.is_file():
            raise InputError(f"no such file in the dataset directory (reading: "
                             f"{', '.join(files)})", file=str(file))
    return found


def _describe(files: list[Path]) -> str:
    if len(files) == 1:
        return str(files[0])
    return f"{files[0].parent}/{{{','.join(f.name for f in files)}}}"


def _timed_log(layout: Layout, path, files, progress) -> SourceLog:
    found = _x1_files(path, files)
    rows = _Rows(found)
    for batch in _read_x1(layout, found, progress):
        rows.add(batch.file, batch.ints["user_id"], batch.ints["item_id"],
                 batch.ints[layout.labels[0]].astype(np.int8), batch.ints[layout.time])
    return SourceLog(*rows.arrays(), file=_describe(found), parts=rows.parts())


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


# -- reading and validation --------------------------------------------------------------------
def _read_x1(layout: Layout, files: list[Path], progress: Progress | None
             ) -> Iterator[Batch]:
    """Validated batches of every file in turn, with a progress bar over their bytes."""
    bar = _Bar(layout.name, sum(f.stat().st_size for f in files), progress)
    for file in files:
        _check_header(file, layout)
        for batch in _file_batches(file, layout):
            bar.advance(len(batch))
            yield batch
    bar.done()


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
    malformed line, which `_csv_batches` reports with its physical line number)."""
    for row0, record in _csv_batches(file, layout.columns, ","):
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


# -- progress --------------------------------------------------------------------------------
class _Bar:
    """A text progress bar, one line per tenth of the input (lines suit logs and terminals).

    Bytes are estimated as blocks read x block size: each record batch is one parsed block."""

    STEPS = 10

    def __init__(self, name: str, total_bytes: int, progress: Progress | None):
        self.name, self.total, self.say = name, max(total_bytes, 1), progress
        self.blocks = self.rows = self.shown = 0
        self.start = time.perf_counter()

    def advance(self, rows: int) -> None:
        self.blocks += 1
        self.rows += rows
        step = min(self.STEPS, self.blocks * _BLOCK_BYTES * self.STEPS // self.total)
        if step > self.shown and step < self.STEPS:
            self.shown = step
            self._show(step / self.STEPS)

    def done(self) -> None:
        self._show(1.0)

    def _show(self, fraction: float) -> None:
        if self.say is None:
            return
        width = 20
        bar = "#" * round(fraction * width) + "-" * (width - round(fraction * width))
        seconds = time.perf_counter() - self.start
        self.say(f"{self.name} [{bar}] {fraction:4.0%} of {self.total / 1e9:.2f} GB, "
                 f"{self.rows:,} rows, {self.rows / max(seconds, 1e-9):,.0f} rows/s")


# -- AmazonElectronics: sequences from histories ---------------------------------------------
class _Longest:
    """Per user, the row with the longest history (a positive wins a tie) and its history text.

    Each batch contributes one candidate per user, so only O(users x batches) strings are
    kept, never the whole history column."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.texts: list[pa.Array] = []

    def add(self, batch: Batch, first_row: int) -> None:
        user, label = batch.ints["user_id"], batch.ints["label"]
        hlen = batch.tokens["item_history"]
        pick = _last_per_group(user, hlen, label)
        self.parts.append((user[pick], hlen[pick], label[pick], batch.ints["item_id"][pick],
                           pick + first_row))
        self.texts.append(batch.lists["item_history"].take(pa.array(pick)))

    def resolve(self) -> tuple[np.ndarray, ...]:
        """(users, history length, label, item, global row, flat history ids) per user."""
        user, hlen, label, item, row = (np.concatenate(c) for c in zip(*self.parts))
        pick = _last_per_group(user, hlen, label)
        text = pa.chunked_array(self.texts).take(pa.array(pick)).combine_chunks()
        tokens = pc.list_flatten(pc.split_pattern(text, "^"))
        ids = pc.cast(pc.filter(tokens, pc.not_equal(tokens, "")), pa.int64())
        return (user[pick], hlen[pick], label[pick], item[pick], row[pick],
                ids.to_numpy(zero_copy_only=False))


def _last_per_group(user: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Index of each user's maximum row by `keys` (lexicographic), users ascending."""
    order = np.lexsort((*reversed(keys), user))
    last = np.r_[user[order][1:] != user[order][:-1], True]
    return order[last]


def amazon_sequences(rows: SourceLog, longest: _Longest) -> SourceLog:
    """Reviews (label 1) from the longest histories, negatives (label 0, candidate-only) from
    their rows.

    `rows` holds one entry per CSV row with `ts` = history length (the step)."""
    users, hlen, label, item, row, hist = longest.resolve()
    # The reviews r of each user: its history, plus its item when the row is a positive.
    r_len = hlen + (label == 1)
    r_off = np.concatenate([[0], np.cumsum(r_len)])
    reviews = np.empty(r_off[-1], dtype=np.int64)
    is_hist = np.ones(r_off[-1], dtype=bool)
    is_hist[r_off[1:][label == 1] - 1] = False
    reviews[is_hist] = hist
    reviews[~is_hist] = item[label == 1]
    u = np.searchsorted(users, rows.user)
    _check_positives(rows, u, reviews, r_off, r_len, row)
    step = np.arange(r_off[-1]) - np.repeat(r_off[:-1], r_len)
    neg = rows.label == 0
    return SourceLog(
        user=np.concatenate([np.repeat(users, r_len), rows.user[neg]]),
        item=np.concatenate([reviews, rows.item[neg]]),
        label=np.concatenate([np.ones(len(reviews), np.int8), rows.label[neg]]),
        ts=np.concatenate([step, rows.ts[neg]]),
        # a negative shown at step i comes before review r_i, whose history it shares
        sort_key=np.concatenate([2 * step + 1, 2 * rows.ts[neg]]),
        candidate=np.concatenate([np.zeros(len(reviews), bool), np.ones(int(neg.sum()), bool)]),
        file=rows.file, parts=rows.parts,
        origin=np.concatenate([np.repeat(row, r_len), np.flatnonzero(neg)]))


def _check_positives(rows: SourceLog, u: np.ndarray, reviews: np.ndarray, r_off: np.ndarray,
                     r_len: np.ndarray, longest_row: np.ndarray) -> None:
    pos = np.flatnonzero(rows.label == 1)
    step = rows.ts[pos]
    inside = step < r_len[u[pos]]
    agree = np.zeros(len(pos), dtype=bool)
    agree[inside] = reviews[r_off[u[pos]][inside] + step[inside]] == rows.item[pos][inside]
    if agree.all():
        return
    i = pos[np.argmax(~agree)]
    file, row = rows.locate(i)
    ref_file, ref_row = rows.locate(longest_row[u[i]])
    there = (f"item {reviews[r_off[u[i]] + rows.ts[i]]}" if inside[np.argmax(~agree)]
             else "no item (it is shorter)")
    raise InputError(
        f"positive row of user {rows.user[i]} has item {rows.item[i]} after {rows.ts[i]} "
        f"history items, but the user's longest history ({ref_file}, row {ref_row}) has "
        f"{there} there: the rows do not share one history (file line {row + 1})",
        file=file, row=row)
