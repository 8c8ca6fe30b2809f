"""AmazonElectronics_x1: each user's sequence rebuilt from the histories its rows repeat.

The rows (DIN's, shuffled, no timestamp) give each user's reviews r0, r1, ..., r_k as the
longest `item_history` among them (plus that row's item when it is a positive), and
candidate-only negatives; `read_amazon_x1` in reczoo.py documents the rebuild.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from malloc_ray.data.sources.reczoo_csv import Batch
from malloc_ray.data.sources.reczoo_files import SourceLog
from malloc_ray.errors import InputError


class Longest:
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


def amazon_sequences(rows: SourceLog, longest: Longest) -> SourceLog:
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
