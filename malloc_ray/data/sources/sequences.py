"""Item-sequence files (S3-Rec / ICLRec layout) -> InteractionLog with sampled negatives.

One user per line, space-separated integers: `user item_1 ... item_n`, items in chronological
order. Every interaction is a positive. A CTR set needs negatives, and where they go matters: a
negative placed in the history after each positive makes the label stream alternate, which a
model that sees earlier labels reads off (docs/data.md, "Label-stream audit"). So each positive
at position p >= 1 gets `negatives` candidate-only negatives at the same prefix: items the user
never touched, drawn uniformly and seeded; they are scored with the user's first p items as
history and never enter it (the DIN form of a negative: shown, not clicked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from malloc_ray.data.sources.interactions import InteractionLog
from malloc_ray.errors import InputError

_MAX_DRAWS = 64  # rounds of redrawing negatives that hit an item the user touched


def read_sequences(path: str | Path, *, negatives: int = 1, seed: int = 0) -> InteractionLog:
    """Read `path` and add `negatives` candidate-only negatives per positive after the first."""
    path = Path(path)
    if not isinstance(negatives, int) or negatives < 0:
        raise InputError(f"negatives must be an int >= 0, got {negatives!r}", key="negatives")
    users, lengths, items, lines = _parse(path)
    step = np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    user = np.repeat(users, lengths)
    neg_user, neg_step, neg_item = _sample_negatives(user, step, items, negatives, seed,
                                                     path, dict(zip(users.tolist(), lines)))
    n_pos, n_neg = len(items), len(neg_item)
    return InteractionLog(
        user=np.concatenate([user, neg_user]), item=np.concatenate([items, neg_item]),
        label=np.concatenate([np.ones(n_pos, np.int8), np.zeros(n_neg, np.int8)]),
        ts=np.concatenate([step, neg_step]),
        # a negative at prefix p sorts after item p-1 and before item p
        sort_key=np.concatenate([2 * step + 1, 2 * neg_step]),
        candidate=np.concatenate([np.zeros(n_pos, bool), np.ones(n_neg, bool)]),
        negatives="uniform" if n_neg else None, file=str(path))


def _parse(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, lengths, flat items, 1-based line of each user); bad lines name their line."""
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    users, lengths, lines, chunks = [], [], [], []
    seen: dict[int, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            tokens = raw.split()
            if not tokens:
                raise InputError("empty line (expected 'user item_1 ... item_n')",
                                 file=str(path), row=number)
            bad = next((t for t in tokens if not t.isdigit()), None)  # ASCII digits only
            if bad is not None:
                raise InputError(f"not a non-negative integer: {bad.decode(errors='replace')!r}",
                                 file=str(path), row=number)
            ids = [int(t) for t in tokens]
            if len(ids) < 2:
                raise InputError("a user with no items", file=str(path), row=number)
            if ids[0] in seen:
                raise InputError(f"user {ids[0]} is listed twice (first on line "
                                 f"{seen[ids[0]]})", file=str(path), row=number)
            seen[ids[0]] = number
            users.append(ids[0])
            lengths.append(len(ids) - 1)
            lines.append(number)
            chunks.append(ids[1:])
    if not users:
        raise InputError("no users in file", file=str(path))
    items = np.fromiter((i for c in chunks for i in c), dtype=np.int64, count=sum(lengths))
    return (np.array(users, np.int64), np.array(lengths, np.int64), items,
            np.array(lines, np.int64))


def draw_untouched(owner: np.ndarray, keys: np.ndarray, base: int, pool: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each owner an item of `pool` drawn uniformly, redrawn while the owner touched it
    (`keys`: sorted owner * base + item), for at most `_MAX_DRAWS` rounds. Returns (items,
    the indices whose last draw was still touched). `prepare` draws the negatives with it, and
    training draws them again (`loader.redraw_negatives`)."""
    drawn = np.empty(len(owner), dtype=np.int64)
    todo = np.arange(len(owner))
    for _ in range(_MAX_DRAWS):
        if not len(todo):
            break
        drawn[todo] = pool[rng.integers(0, len(pool), len(todo))]
        wanted = owner[todo] * base + drawn[todo]
        hit = keys[np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)] == wanted
        todo = todo[hit]
    return drawn, todo


def _sample_negatives(user, step, items, negatives: int, seed: int, path: Path,
                      line_of: dict[int, int]):
    """`negatives` items per positive at step >= 1, none of them touched by its user."""
    pick = np.repeat(np.flatnonzero(step >= 1), negatives)
    vocab = np.unique(items)
    n_user = np.unique(user, return_inverse=True)[1]
    touched = np.unique(n_user * (vocab.max() + 1) + items)  # sorted (user, item) keys
    owner = n_user[pick]
    drawn, todo = draw_untouched(owner, touched, vocab.max() + 1, vocab,
                                 np.random.default_rng(seed))
    if len(todo):
        u = int(user[pick[todo[0]]])
        raise InputError(f"user {u} touched nearly every item: no untouched item to sample as "
                         f"a negative", file=str(path), row=int(line_of[u]))
    return user[pick], step[pick], drawn
