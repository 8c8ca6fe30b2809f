"""Write known per-user sequences in the exact reczoo layouts (docs/data.md, "reczoo datasets").

Each writer takes chronological sequences (`Truth`) and writes the files the way reczoo's own
converters do, quirks included (KuaiVideo's earliest-100 history, DIN's shuffled rows with one
sampled negative per step, LongCTR's seq_len pointers), and returns the sequence a correct
reader must rebuild. Used by tests/test_reczoo.py and tests/test_paper_specs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from malloc_ray.data.sources import generate

KUAI_HEADER = "timestamp,user_id,item_id,is_click,is_like,is_follow,pos_items,neg_items"
MICRO_HEADER = "user_id,item_id,cate_id,is_click,timestamp,clicked_items,clicked_categories"
AMAZON_HEADER = "label,user_id,item_id,cate_id,item_history,cate_history"
HISTORY_CAP = 100  # BARS x1 histories
CATEGORIES = 514


@dataclass
class Truth:
    """Chronological sequences, grouped by user (user ascending, then time)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    ts: np.ndarray

    def by_user(self) -> dict[int, tuple[list[int], list[int]]]:
        out: dict[int, tuple[list[int], list[int]]] = {}
        for u, i, lab in zip(self.user.tolist(), self.item.tolist(), self.label.tolist()):
            items, labels = out.setdefault(u, ([], []))
            items.append(i)
            labels.append(lab)
        return out


def paper_truth(profile: str, users: int, *, max_len: int | None = None, seed: int = 0,
                items: int = 5000) -> Truth:
    """Sequences with a paper profile's Table 1 shape (the synthetic generator), with sparse
    raw ids and per-user increasing timestamps that interleave users, as in the real files."""
    log = generate(profile, users, max_len=max_len, items=items, categories=50, seed=seed)
    rng = np.random.default_rng(seed)
    user_ids = np.sort(rng.choice(10 * users + 100, users, replace=False)) + 1
    lengths = np.bincount(log.user, minlength=users)
    steps = np.cumsum(rng.integers(1, 1000, len(log)))
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    ts = steps - np.repeat(steps[first], lengths) + np.repeat(rng.integers(0, 10**6, users),
                                                                 lengths)
    return Truth(user_ids[log.user], log.item * 7 + 3, log.label.astype(np.int8),
                 ts + 1_500_000_000)


def _chrono_split(truth: Truth, fractions: tuple[float, ...]) -> np.ndarray:
    """Split index per interaction: each user's last fractions go to the later files."""
    starts = np.r_[0, np.flatnonzero(np.diff(truth.user)) + 1]
    lengths = np.diff(np.r_[starts, len(truth.user)])
    pos = np.arange(len(truth.user)) - np.repeat(starts, lengths)
    frac = pos / np.repeat(lengths, lengths)
    cuts = np.cumsum(fractions)[:-1]
    return np.searchsorted(cuts, frac, side="right")


def _joined(ids) -> str:
    return "^".join(map(str, ids))


# -- KuaiVideo_x1 ---------------------------------------------------------------------------------
def write_kuaivideo_x1(out: Path, truth: Truth, *, seed: int = 0) -> Path:
    """train.csv/test.csv sorted by timestamp; pos/neg_items = the EARLIEST 100 earlier
    clicks / non-clicks of the user (the converter's quirk)."""
    rng = np.random.default_rng(seed)
    pos_text, neg_text = [], []
    for items, labels in _per_user(truth):
        pos, neg = [], []
        for item, label in zip(items, labels):
            pos_text.append(_joined(pos[:HISTORY_CAP]))
            neg_text.append(_joined(neg[:HISTORY_CAP]))
            (pos if label else neg).append(item)
    like = (rng.random(len(truth.user)) < 0.1).astype(int) * truth.label
    follow = (rng.random(len(truth.user)) < 0.02).astype(int)
    lines = [f"{t},{u},{i},{c},{lk},{f},{p},{n}" for t, u, i, c, lk, f, p, n in zip(
        truth.ts.tolist(), truth.user.tolist(), truth.item.tolist(), truth.label.tolist(),
        like.tolist(), follow.tolist(), pos_text, neg_text)]
    return _write_x1(out, KUAI_HEADER, lines, _chrono_split(truth, (0.8, 0.2)),
                     order=np.argsort(truth.ts, kind="stable"))


def _per_user(truth: Truth):
    starts = np.r_[0, np.flatnonzero(np.diff(truth.user)) + 1, len(truth.user)]
    for a, b in zip(starts[:-1], starts[1:]):
        yield truth.item[a:b].tolist(), truth.label[a:b].tolist()


def _write_x1(out: Path, header: str, lines: list[str], split: np.ndarray,
              order: np.ndarray) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(("train.csv", "test.csv")):
        rows = [lines[i] for i in order if split[i] == index]
        (out / name).write_text(header + "\n" + "".join(f"{r}\n" for r in rows))
    return out


# -- MicroVideo1.7M_x1 ----------------------------------------------------------------------------
def item_category(item) -> np.ndarray:
    return np.asarray(item) % CATEGORIES


def write_microvideo_x1(out: Path, truth: Truth) -> Path:
    """train.csv/test.csv in time order; clicked_items/categories = the latest 100 earlier
    clicks of the user."""
    hist_items, hist_cats = [], []
    for items, labels in _per_user(truth):
        clicked: list[int] = []
        for item, label in zip(items, labels):
            last = clicked[-HISTORY_CAP:]
            hist_items.append(_joined(last))
            hist_cats.append(_joined(item_category(last).tolist()))
            if label:
                clicked.append(item)
    cats = item_category(truth.item)
    lines = [f"{u},{i},{c},{y},{t},{hi},{hc}" for u, i, c, y, t, hi, hc in zip(
        truth.user.tolist(), truth.item.tolist(), cats.tolist(), truth.label.tolist(),
        truth.ts.tolist(), hist_items, hist_cats)]
    return _write_x1(out, MICRO_HEADER, lines, _chrono_split(truth, (0.7, 0.3)),
                     order=np.argsort(truth.ts, kind="stable"))


# -- AmazonElectronics_x1 -------------------------------------------------------------------------
def write_amazon_x1(out: Path, reviews: dict[int, list[int]], *, items: int = 5000,
                    categories: dict[int, int] | None = None, seed: int = 0) -> Truth:
    """DIN's build_dataset: for every review i >= 1 a positive row (the real item) and a
    negative row (a random item the user never reviewed), both with history r[:i]; the last
    review goes to test.csv, the rest to train.csv; both files shuffled.

    Returns the rebuilt sequence a reader must give: r0, n1, r1, ..., n_k, r_k."""
    rng = np.random.default_rng(seed)
    known = categories or {}

    def cat(item):  # the item's real category where given
        return known.get(item, int(item_category(item)))

    files: dict[str, list[str]] = {"train.csv": [], "test.csv": []}
    truth: list[tuple[int, int, int, int]] = []
    for user, r in sorted(reviews.items()):
        truth.append((user, r[0], 1, 0))
        for i in range(1, len(r)):
            neg = int(rng.integers(1, items))
            while neg in r:
                neg = int(rng.integers(1, items))
            hist, cats = _joined(r[:i]), _joined(cat(x) for x in r[:i])
            name = "test.csv" if i == len(r) - 1 else "train.csv"
            files[name].append(f"1,{user},{r[i]},{cat(r[i])},{hist},{cats}")
            files[name].append(f"0,{user},{neg},{cat(neg)},{hist},{cats}")
            truth += [(user, neg, 0, i), (user, r[i], 1, i)]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        rows = [rows[k] for k in rng.permutation(len(rows))]
        (out / name).write_text(AMAZON_HEADER + "\n" + "".join(f"{r}\n" for r in rows))
    user, item, label, ts = (np.array(c) for c in zip(*truth))
    return Truth(user, item, label.astype(np.int8), ts)


def amazon_reviews(users: int, *, mean: float = 9.0, items: int = 5000,
                   seed: int = 0) -> dict[int, list[int]]:
    """Distinct reviewed items per user, 5-core like DIN's (at least 5 reviews)."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(5, rng.poisson(mean, users))
    return {int(u) * 3 + 1: rng.choice(np.arange(1, items), n, replace=False).tolist()
            for u, n in enumerate(lengths)}


# -- LongCTR x2 -----------------------------------------------------------------------------------
def write_longctr_x2(out: Path, truth: Truth) -> Truth:
    """user_index = dense user, item_index = item; full_item_seq = the user's clicked items
    in order, and a row's seq_len = how many of them came before it. Rows split per user
    chronologically 80/10/10 into train/valid/test.parquet. Returns the truth with dense
    user indices."""
    out.mkdir(parents=True, exist_ok=True)
    users, user_index = np.unique(truth.user, return_inverse=True)
    seqs, seq_len = [], np.zeros(len(truth.user), dtype=np.int64)
    k = 0
    for items, labels in _per_user(truth):
        clicked: list[int] = []
        for item, label in zip(items, labels):
            seq_len[k] = len(clicked)
            k += 1
            if label:
                clicked.append(item)
        seqs.append(clicked)
    pq.write_table(pa.table({"full_item_seq": pa.array(seqs, type=pa.list_(pa.int64()))}),
                   out / "user_info.parquet")
    item_ids = np.unique(truth.item)
    pq.write_table(pa.table({"item_index": np.arange(len(item_ids) + 1),
                             "item_id": np.r_[0, item_ids]}), out / "item_info.parquet")
    split = _chrono_split(truth, (0.8, 0.1, 0.1))
    for index, name in enumerate(("train", "valid", "test")):
        keep = split == index
        pq.write_table(pa.table({"user_index": user_index[keep], "item_index": truth.item[keep],
                                 "seq_len": seq_len[keep],
                                 "is_click": truth.label[keep].astype(np.int64)}),
                       out / f"{name}.parquet")
    return Truth(user_index.astype(np.int64), truth.item, truth.label, seq_len)
