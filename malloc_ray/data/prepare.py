"""Source reader -> validated, split dataset directory (written atomically) + Table 1 stats.

Layout and split protocol: docs/data.md. Other packages read exactly these files, so the column
names and dtypes here are a contract.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import re
import secrets
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from malloc_ray.config import TYPE_WORDS, has_type
from malloc_ray.data import audit
from malloc_ray.data.sources import SOURCE_CHECKS, SOURCES, InteractionLog
from malloc_ray.errors import InputError
from malloc_ray.files import check_writable_dir

FORMAT_VERSION = 1
MIN_INTERACTIONS = 3  # one train history item, a valid target and a test target
SPLITS = ("train", "valid", "test")
EVAL_FRACTION = 0.1  # share of each user's interactions in valid, and again in test
SPLIT_PROTOCOL = (
    "Per-user chronological: of a user's n interactions the last k = max(1, floor(0.1 n)) are "
    "test targets, the k before them valid targets, and every earlier one except the first a "
    "train target; each target is scored from all the user's earlier interactions.")
STATS_KEYS = ("users", "items", "interactions", "max_length", "avg_length", "positive_rate")
# written by every prepare; optional when reading, so older dataset dirs stay readable
OPTIONAL_STATS_KEYS = ("label_stream_auc",)
META_KEYS = ("format_version", "dataset_id", "name", "source", "stats", "vocab_size", "splits",
             "split_protocol", "dropped_users")

Progress = Callable[[str], None]
# prepare()'s own options and their types; every other option of a recipe is the reader's
PREPARE_OPTIONS = {"max_seq_len": int, "drop_short_users": bool, "name": str, "strict": bool}


@dataclass
class Sequences:
    """Users' chronological sequences, flat; user u owns [offsets[u], offsets[u+1]).

    `candidates` (dense ids) holds the rows scored as candidates only (InteractionLog.candidate):
    user, prefix_len (history interactions before it), item, label; None when there are none.
    """

    raw_users: np.ndarray  # int64, index = dense user id
    raw_items: np.ndarray  # int64, index = dense item id - 1
    lengths: np.ndarray  # int64
    items: np.ndarray  # int32, dense ids 1..V
    labels: np.ndarray  # int8
    ts: np.ndarray  # int64
    dropped_users: int
    candidates: dict[str, np.ndarray] | None = None


def prepare(source: str, out: str | Path, *, overwrite: bool = False,
            max_seq_len: int | None = None, drop_short_users: bool = False,
            name: str | None = None, progress: Progress | None = None, strict: bool = False,
            **options) -> dict:
    """Read `source` (a key of SOURCES) with `options` and write the dataset dir `out`.

    Returns the meta dict written to meta.json. `strict`: a label stream that predicts the
    targets (audit.WARN_ABOVE) is an error instead of a warning, and nothing is written.
    """
    say = progress or (lambda _msg: None)
    args = check_recipe({"source": source, "max_seq_len": max_seq_len, "name": name,
                         "drop_short_users": drop_short_users, "strict": strict, **options})
    reader = SOURCES[source]
    _check_target(Path(out), overwrite)  # fail before a long read, not after
    say(f"reading {source} ...")
    # Streaming readers report progress themselves; it is not a setting, so not in meta.json.
    log = reader(**args, **({"progress": say} if _takes_progress(reader) else {}))
    say(f"read {len(log):,} interactions of {len(np.unique(log.user)):,} users")
    recorded = {"kind": source, **{k: str(v) if isinstance(v, Path) else v
                                   for k, v in args.items()},
                "max_seq_len": max_seq_len, "drop_short_users": drop_short_users}
    path = Path(args.get("path", ""))
    # a directory's whole name: "MicroVideo1.7M_x1" has no file suffix to strip
    default_name = (f"synthetic-{args['profile']}" if source == "synthetic"
                    else path.name if path.is_dir() else path.stem)
    return write_dataset(log, out, name=name or default_name, source=recorded,
                         overwrite=overwrite, max_seq_len=max_seq_len,
                         drop_short_users=drop_short_users, progress=say, strict=strict)


def write_dataset(log: InteractionLog, out: str | Path, *, name: str, source: dict,
                  overwrite: bool = False, max_seq_len: int | None = None,
                  drop_short_users: bool = False, progress: Progress | None = None,
                  strict: bool = False) -> dict:
    """Sort, truncate, split, audit and atomically write `log` as a dataset dir; returns meta."""
    say = progress or (lambda _msg: None)
    out = Path(out)
    _check_target(out, overwrite)
    seqs = build_sequences(log, max_seq_len=max_seq_len, drop_short_users=drop_short_users)
    samples = build_samples(seqs.lengths, seqs.candidates, seqs)
    say(f"{len(seqs.lengths):,} users, {len(seqs.items):,} interactions, "
        f"{len(seqs.raw_items):,} items, {len(samples['user']):,} samples"
        + (f" ({seqs.dropped_users:,} short users dropped)" if seqs.dropped_users else ""))
    meta = _meta(seqs, samples, name, source, log.negatives)
    leak = audit.leak_message(name, meta["stats"]["label_stream_auc"])
    if leak and strict:
        raise InputError(f"{leak}; refusing to write it (--strict)", file=str(out))
    if leak and progress is not None:
        say(f"warning: {leak}")
    elif leak:  # called from Python without a progress callback: still seen
        warnings.warn(leak, stacklevel=2)
    say(f"writing {out} (dataset_id {meta['dataset_id']})")
    _atomic_write(out, overwrite, lambda tmp: _write_files(tmp, seqs, samples, meta))
    return meta


def build_sequences(log: InteractionLog, *, max_seq_len: int | None = None,
                    drop_short_users: bool = False) -> Sequences:
    """Dense ids, per-user chronological order (ties keep file order), most recent max_seq_len.

    Candidate-only rows never count as interactions: they become `Sequences.candidates` at the
    prefix of the history rows sorted before them, and are dropped when that prefix is cut
    away by max_seq_len (or is empty)."""
    if max_seq_len is not None and max_seq_len < MIN_INTERACTIONS:
        raise InputError(f"max_seq_len must be >= {MIN_INTERACTIONS}, got {max_seq_len}",
                         key="max_seq_len")
    cand = (np.zeros(len(log), dtype=bool) if log.candidate is None
            else np.asarray(log.candidate, dtype=bool))
    raw_users, uidx = np.unique(log.user, return_inverse=True)
    counts = np.bincount(uidx[~cand], minlength=len(raw_users))
    short = counts < MIN_INTERACTIONS
    if short.any() and not drop_short_users:
        _raise_short_user(log, uidx, raw_users, counts, short, cand)
    key = log.ts if log.sort_key is None else log.sort_key
    order = np.lexsort((np.arange(len(uidx)), key, uidx))
    order = order[~short[uidx[order]]]
    if not (~cand[order]).any():
        raise InputError(f"no user has at least {MIN_INTERACTIONS} interactions", file=log.file)
    user, is_cand = uidx[order], cand[order]
    # prefix of every row: history rows of its user sorted before it
    hist_before = np.cumsum(~is_cand) - (~is_cand)
    prefix = hist_before - hist_before[np.searchsorted(user, user, side="left")]
    cut = np.zeros(len(raw_users), dtype=np.int64)  # history rows cut from each user's front
    if max_seq_len is not None:
        cut = np.maximum(counts - max_seq_len, 0)
    prefix = prefix - cut[user]
    keep = np.where(is_cand, prefix >= 1, prefix >= 0)
    order, user, is_cand, prefix = order[keep], user[keep], is_cand[keep], prefix[keep]
    kept_users, user = np.unique(user, return_inverse=True)
    raw_items, item = np.unique(log.item[order], return_inverse=True)
    item = (item + 1).astype(np.int32)
    hist = ~is_cand
    candidates = None
    if is_cand.any():
        candidates = {"user": user[is_cand].astype(np.int64),
                      "prefix_len": prefix[is_cand].astype(np.int32),
                      "item": item[is_cand], "label": log.label[order][is_cand].astype(np.int8)}
    return Sequences(raw_users=raw_users[kept_users], raw_items=raw_items,
                     lengths=np.bincount(user[hist], minlength=len(kept_users)).astype(np.int64),
                     items=item[hist], labels=log.label[order][hist].astype(np.int8),
                     ts=log.ts[order][hist].astype(np.int64), dropped_users=int(short.sum()),
                     candidates=candidates)


def _raise_short_user(log: InteractionLog, uidx: np.ndarray, raw_users: np.ndarray,
                      counts: np.ndarray, short: np.ndarray, cand: np.ndarray) -> None:
    rows = np.flatnonzero(short[uidx] & ~cand)  # file order: the first short user met
    first_row = (rows if len(rows) else np.flatnonzero(short[uidx]))[0]
    u = uidx[first_row]
    # A log read from several files knows which file and row each interaction came from.
    locate = getattr(log, "locate", None)
    file, row = (locate(int(first_row)) if locate else
                 (log.file, int(first_row) + 1 if log.file else None))
    raise InputError(
        f"user {raw_users[u]} has {counts[u]} interaction(s), first at this row; every user "
        f"needs at least {MIN_INTERACTIONS} (history, valid and test targets); "
        f"{int(short.sum())} user(s) are this short: drop them with drop_short_users=True "
        f"(--drop-short-users)",
        file=file, row=row)


def eval_count(lengths) -> np.ndarray:
    """k: how many of a user's last interactions are test targets (and, before them, valid).

    More than one per user where histories allow, so that GAUC (which skips users whose
    targets are all of one class) is defined."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.maximum(1, (lengths * EVAL_FRACTION).astype(np.int64))


def last_train_prefix(lengths) -> np.ndarray:
    """prefix_len of each user's last train target (0: the user has none)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths - 2 * eval_count(lengths) - 1


def build_samples(lengths: np.ndarray, candidates: dict[str, np.ndarray] | None = None,
                  seqs: Sequences | None = None) -> dict[str, np.ndarray]:
    """One row per target: prefix_len 1..n-1 of each user, split by SPLIT_PROTOCOL.

    With `candidates` (and `seqs`, whose interactions the positive rows name) every row names
    its candidate and label explicitly: each interaction at prefix_len 1..n-1 is its own
    candidate, and every candidate-only row is one more sample at its prefix_len (1..n)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    per_user = lengths - 1
    user = np.repeat(np.arange(len(lengths), dtype=np.int64), per_user)
    first = np.repeat(np.cumsum(per_user) - per_user, per_user)
    prefix = np.arange(len(user), dtype=np.int64) - first + 1
    out = {"user": user, "prefix_len": prefix}
    if candidates is not None:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        at = offsets[user] + prefix
        out = {"user": np.concatenate([user, candidates["user"]]),
               "prefix_len": np.concatenate([prefix, candidates["prefix_len"]]),
               "candidate": np.concatenate([seqs.items[at], candidates["item"]]),
               "label": np.concatenate([seqs.labels[at], candidates["label"]])}
        # (user, prefix_len) order, the interaction itself before the other candidates
        order = np.lexsort((np.arange(len(out["user"])), out["prefix_len"], out["user"]))
        out = {k: v[order] for k, v in out.items()}
    user, prefix = out["user"], out["prefix_len"].astype(np.int64)
    user_len = lengths[user]
    k = eval_count(user_len)
    split = np.zeros(len(user), dtype=np.int8)  # index into SPLITS
    split[prefix >= user_len - 2 * k] = 1
    split[prefix >= user_len - k] = 2
    out.update(prefix_len=prefix.astype(np.int32), split=split,
               user_len=user_len.astype(np.int32))
    if candidates is not None:
        out["candidate"] = out["candidate"].astype(np.int32)
        out["label"] = out["label"].astype(np.int8)
    return out


def dataset_id(seqs: Sequences, samples: dict[str, np.ndarray]) -> str:
    """Hash of the canonical arrays (not of parquet bytes, which vary with library versions)."""
    digest = hashlib.sha256(f"malloc-ray dataset v{FORMAT_VERSION}".encode())
    arrays = {"lengths": seqs.lengths.astype("<i8"), "items": seqs.items.astype("<i4"),
              "labels": seqs.labels.astype("i1"), "ts": seqs.ts.astype("<i8"),
              "s.user": samples["user"].astype("<i8"),
              "s.prefix_len": samples["prefix_len"].astype("<i4"),
              "s.split": samples["split"].astype("i1"),
              "s.user_len": samples["user_len"].astype("<i4")}
    if "candidate" in samples:  # only then: ids of datasets without candidates are unchanged
        arrays.update({"s.candidate": samples["candidate"].astype("<i4"),
                       "s.label": samples["label"].astype("i1")})
    for key, arr in arrays.items():
        digest.update(f"{key}:{arr.dtype.str}:{len(arr)};".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def _meta(seqs: Sequences, samples: dict[str, np.ndarray], name: str, source: dict,
          negatives: str | None = None) -> dict:
    split_counts = np.bincount(samples["split"], minlength=len(SPLITS))
    # Scored targets: with candidates the history holds only interactions, so its labels
    # would say nothing of the negatives.
    targets = audit.target_labels(seqs.lengths, seqs.labels, samples)
    stats = {
        "users": int(len(seqs.lengths)),
        "items": int(len(seqs.raw_items)),
        "interactions": int(len(seqs.items)),
        "max_length": int(seqs.lengths.max()),
        "avg_length": round(float(seqs.lengths.mean()), 4),
        "positive_rate": round(float((targets if "label" in samples else seqs.labels).mean()),
                               4),
        "label_stream_auc": audit.label_stream_auc(seqs.lengths, seqs.labels, samples, SPLITS),
    }
    return {"format_version": FORMAT_VERSION, "dataset_id": dataset_id(seqs, samples),
            "name": name, "source": source, "stats": stats,
            "vocab_size": int(len(seqs.raw_items)) + 1,
            "splits": {s: int(n) for s, n in zip(SPLITS, split_counts)},
            "split_protocol": SPLIT_PROTOCOL, "dropped_users": seqs.dropped_users,
            "candidates": "candidate" in samples,
            # how the candidate-only negatives were drawn ("uniform"), None: logged ones
            "negatives": negatives if "candidate" in samples else None}


def _write_files(target: Path, seqs: Sequences, samples: dict[str, np.ndarray],
                 meta: dict) -> None:
    offsets = pa.array(np.concatenate([[0], np.cumsum(seqs.lengths)]).astype(np.int32))

    def as_lists(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    pq.write_table(pa.table({
        "user": pa.array(np.arange(len(seqs.lengths), dtype=np.int64)),
        "raw_user": pa.array(seqs.raw_users.astype(str)),
        "items": as_lists(seqs.items), "labels": as_lists(seqs.labels),
        "ts": as_lists(seqs.ts)}), target / "users.parquet")
    pq.write_table(pa.table({
        "item": pa.array(np.arange(1, len(seqs.raw_items) + 1, dtype=np.int32)),
        "raw_item": pa.array(seqs.raw_items.astype(str))}), target / "items.parquet")
    columns = {"user": pa.array(samples["user"]), "prefix_len": pa.array(samples["prefix_len"]),
               "split": pa.array(np.array(SPLITS)[samples["split"]]),
               "user_len": pa.array(samples["user_len"])}
    if "candidate" in samples:
        columns.update(candidate=pa.array(samples["candidate"]), label=pa.array(samples["label"]))
    pq.write_table(pa.table(columns), target / "samples.parquet")
    (target / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        check_writable_dir(out.parent, file=str(out))
        return
    if not overwrite:
        raise InputError("output already exists; pass overwrite=True (--overwrite) to replace "
                         "it", file=str(out))
    # Overwrite removes the old dir: only ever do that to a dataset (or an empty dir).
    if not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file()):
        raise InputError("refusing to overwrite: not a dataset directory (no meta.json)",
                         file=str(out))
    check_writable_dir(out.parent, file=str(out))


def _atomic_write(out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Write into <out>.tmp-<host>-<pid>-<random> beside `out`, then rename it into place.

    On any error the temp dir is removed and an existing `out` is left as it was; what a
    killed prepare left (its pid is dead) is removed by the next prepare of the same `out`.
    """
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = _scratch(out, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            old = _scratch(out, "old")
            os.replace(out, old)  # a dir cannot be renamed over a non-empty dir
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _scratch(out: Path, kind: str) -> Path:
    # Host and pid in the name tell a live writer's dir from a killed one's (remove_stale).
    return out.with_name(f"{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"
                         f"{secrets.token_hex(6)}")


def remove_stale(out: Path) -> list[Path]:
    """Remove the tmp/old dirs of `out` left by killed prepares: made on this host by a pid
    that is gone. Those of live processes, and of other hosts (a shared disk), are kept."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(.+)-(\d+)-[0-9a-f]{12}")
    removed = []
    for path in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        match = pattern.fullmatch(path.name)
        if match and match[2] == socket.gethostname() and not _alive(int(match[3])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, alive
        pass
    return True


def check_recipe(recipe: dict) -> dict:
    """The reader arguments of a recipe {source, prepare()'s own options, reader options},
    defaults filled in; what `prepare` would refuse is refused here, before any reading (a
    study checks its recipes before it starts)."""
    source = recipe.get("source")
    if not isinstance(source, str) or source not in SOURCES:
        problem = f"unknown source {source!r}" if "source" in recipe else "no source given"
        raise InputError(f"{problem} (choose from {', '.join(SOURCES)})", key="source")
    for key, kind in PREPARE_OPTIONS.items():
        value = recipe.get(key)
        if value is not None and not has_type(value, kind):
            raise InputError(f"must be {TYPE_WORDS[kind]}, got {value!r}", key=key)
    if recipe.get("max_seq_len") is not None and recipe["max_seq_len"] < MIN_INTERACTIONS:
        raise InputError(f"max_seq_len must be >= {MIN_INTERACTIONS}, got "
                         f"{recipe['max_seq_len']}", key="max_seq_len")
    args = _bind(SOURCES[source], {k: v for k, v in recipe.items()
                                   if k != "source" and k not in PREPARE_OPTIONS})
    if source in SOURCE_CHECKS:
        SOURCE_CHECKS[source](**args)
    return args


def _bind(reader: Callable, options: dict) -> dict:
    """Reader arguments with defaults filled in, so meta.json records every setting."""
    known = [p for p in inspect.signature(reader).parameters if p != "progress"]
    for key in options:
        if key not in known:
            raise InputError(f"not an option of this source; its options: {', '.join(known)}",
                             key=key)
    try:
        bound = inspect.signature(reader).bind(**options)
    except TypeError as exc:  # a required option is missing
        raise InputError(f"bad options for this source: {exc}", key="source") from exc
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("progress", None)
    # tuple defaults (reczoo `files`) as lists: what meta.json and recipe stamps read back
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def _takes_progress(reader: Callable) -> bool:
    return "progress" in inspect.signature(reader).parameters


def read_meta(directory: str | Path) -> dict:
    """meta.json of a dataset dir, checked for the keys and format version this code knows."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise InputError("not a dataset directory (no meta.json)", file=str(directory))
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"invalid JSON ({exc})", file=str(path)) from exc
    if not isinstance(meta, dict):
        raise InputError("expected a JSON object", file=str(path))
    for key in META_KEYS:
        if key not in meta:
            raise InputError("missing key", file=str(path), key=key)
    if meta["format_version"] != FORMAT_VERSION:
        raise InputError(f"format_version {meta['format_version']!r} is not supported "
                         f"(expected {FORMAT_VERSION}); prepare the dataset again",
                         file=str(path), key="format_version")
    for key in STATS_KEYS:
        if not isinstance(meta["stats"], dict) or key not in meta["stats"]:
            raise InputError("missing key", file=str(path), key=f"stats.{key}")
    return meta


def dataset_stats(directory: str | Path) -> dict:
    """The dataset's Table 1 row: name, dataset_id, STATS_KEYS and the label-stream audit
    (None for a dataset prepared before the audit existed)."""
    meta = read_meta(directory)
    return {"name": meta["name"], "dataset_id": meta["dataset_id"],
            **{k: meta["stats"][k] for k in STATS_KEYS},
            **{k: meta["stats"].get(k) for k in OPTIONAL_STATS_KEYS}}


def format_stats(rows: list[dict]) -> str:
    """Rows of `dataset_stats` as a plain-text table laid out like the paper's Table 1."""
    header = ["Dataset", "Users", "Items", "Interactions", "Max length", "Avg length",
              "Positive rate", "Label-stream AUC"]
    body = [[r["name"], f"{r['users']:,}", f"{r['items']:,}", f"{r['interactions']:,}",
             f"{r['max_length']:,}", f"{r['avg_length']:.2f}", f"{r['positive_rate']:.2f}",
             "n/a" if r.get("label_stream_auc") is None else f"{r['label_stream_auc']:.3f}"]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])
