"""Synthetic CTR logs shaped like the MALLOC paper's datasets, with a long-range signal planted.

Length distribution and positive rate follow the paper's Table 1 per profile. The labels follow
hidden per-user tastes over item categories, and a category comes back in a user's stream only
after a gap (mean ~16 steps, never within 6), so the best evidence for a target's label is the
user's clicks on the same category *long ago*; a model seeing only the last 8 interactions
mostly cannot see it. docs/data.md explains the generator and its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from malloc_ray.data.sources.interactions import InteractionLog
from malloc_ray.errors import InputError


@dataclass(frozen=True)
class Profile:
    max_length: int
    avg_length: float
    positive_rate: float


# MALLOC paper, Table 1.
PROFILES = {
    "amazon": Profile(max_length=128, avg_length=9.00, positive_rate=0.44),
    "microvideo": Profile(max_length=1024, avg_length=502.0, positive_rate=0.15),
    "kuaivideo": Profile(max_length=1024, avg_length=416.0, positive_rate=0.17),
}

MIN_LENGTH = 3  # history + valid + test target for every user
LENGTH_SIGMA = 0.8  # log-normal spread of sequence lengths (before capping)
INTERESTS = 16  # categories one user ever interacts with
MIN_GAP = 6  # a category never recurs within this many steps
P_DISLIKED = 0.05  # click probability on a disliked category
P_LIKED_TARGET = 0.8  # about the click probability on a liked one (tuned per profile)


def generate(profile: str = "kuaivideo", users: int = 500, *, max_len: int | None = None,
             items: int = 100, categories: int = 50, seed: int = 0) -> InteractionLog:
    """Draw a synthetic log; the same arguments always give the same log.

    `max_len` caps sequence lengths and scales the profile's length distribution by
    max_len / profile max (kuaivideo with max_len 128: mean 416 * 128/1024 = 52).
    Item i belongs to category (i - 1) % categories; ids are 1..items.
    """
    check_args(profile, users, max_len=max_len, items=items, categories=categories, seed=seed)
    prof = _profile(profile)
    cap = prof.max_length if max_len is None else int(max_len)
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, users, prof.avg_length * cap / prof.max_length, cap)
    steps = int(lengths.max())
    interests = rng.random((users, categories)).argsort(axis=1)[:, :INTERESTS]
    slot = _interest_stream(rng, users, steps)  # (users, steps) index into interests
    cat = np.take_along_axis(interests, slot, axis=1)
    item = _item_in_category(rng, cat, items, categories)
    mean_liked, p_liked = _click_model(prof.positive_rate)
    # Users differ in how many interests they like (uniform on 1..2*mean-1, so the mean and the
    # overall positive rate stay put): a user's click propensity is a second long-range
    # signal, estimated from every label of a long history but from about one click in the
    # last 8. Interests are in random order, so "slot < n_liked" is a random liked subset.
    # Balanced rather than i.i.d. draws keep the positive rate on target for a few hundred users.
    n_liked = np.minimum(rng.permutation(np.arange(users) % (2 * mean_liked - 1)) + 1,
                         INTERESTS - 1)
    p_click = np.where(slot < n_liked[:, None], p_liked, P_DISLIKED)
    label = (rng.random(p_click.shape) < p_click).astype(np.int8)
    keep = np.arange(steps)[None, :] < lengths[:, None]
    return InteractionLog(
        user=np.repeat(np.arange(users, dtype=np.int64), lengths),
        item=item[keep].astype(np.int64),
        label=label[keep],
        ts=np.broadcast_to(np.arange(steps, dtype=np.int64), keep.shape)[keep],
    )


def item_category(item, categories: int = 50) -> np.ndarray:
    """Category of (raw) synthetic item ids."""
    return (np.asarray(item, dtype=np.int64) - 1) % categories


def _profile(name: str) -> Profile:
    if not isinstance(name, str) or name not in PROFILES:
        raise InputError(f"unknown synthetic profile {name!r} (choose from "
                         f"{', '.join(PROFILES)})", key="profile")
    return PROFILES[name]


def check_args(profile: str = "kuaivideo", users: int = 500, *, max_len: int | None = None,
               items: int = 100, categories: int = 50, seed: int = 0) -> None:
    """What `generate` refuses, refused without drawing anything (a study checks its recipes
    before it starts)."""
    _profile(profile)
    for key, value in (("users", users), ("max_len", max_len), ("items", items),
                       ("categories", categories), ("seed", seed)):
        if not (value is None and key == "max_len") and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InputError(f"{key} must be an integer >= 0, got {value!r}", key=key)
    cap = PROFILES[profile].max_length if max_len is None else max_len
    if users < 1:
        raise InputError(f"users must be >= 1, got {users}", key="users")
    if cap < MIN_LENGTH:
        raise InputError(f"max_len must be >= {MIN_LENGTH}, got {cap}", key="max_len")
    if categories < INTERESTS:
        raise InputError(f"categories must be >= {INTERESTS}, got {categories}",
                         key="categories")
    if items < categories:
        raise InputError(f"items ({items}) must be >= categories ({categories})", key="items")


def _lengths(rng: np.random.Generator, users: int, mean: float, cap: int) -> np.ndarray:
    """Capped log-normal lengths with the given mean.

    Stratified draws (one per 1/users quantile slice) keep the sample mean close to the target
    even for a few hundred users.
    """
    mu = _calibrate_mu(mean, cap)
    u = (rng.permutation(users) + rng.random(users)) / users
    z = np.array([NormalDist().inv_cdf(min(max(p, 1e-12), 1 - 1e-12)) for p in u])
    return _capped(mu + LENGTH_SIGMA * z, cap)


def _capped(log_length: np.ndarray, cap: int) -> np.ndarray:
    return np.clip(np.rint(np.exp(log_length)), MIN_LENGTH, cap).astype(np.int64)


@lru_cache(maxsize=None)
def _calibrate_mu(mean: float, cap: int) -> float:
    """Log-scale location whose capped, rounded log-normal has this mean (bisection)."""
    z = _normal_grid()
    lo, hi = -5.0, float(np.log(cap)) + 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _capped(mid + LENGTH_SIGMA * z, cap).mean() < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@lru_cache(maxsize=1)
def _normal_grid(points: int = 4000) -> np.ndarray:
    return np.array([NormalDist().inv_cdf((i + 0.5) / points) for i in range(points)])


def _interest_stream(rng: np.random.Generator, users: int, steps: int) -> np.ndarray:
    """Per step, pick uniformly among the user's interests not seen in the last MIN_GAP steps.

    Every interest is visited equally often (mean gap = INTERESTS) and never twice within
    MIN_GAP steps: the long-range structure the benchmark is about. Vectorised over users.
    """
    last_seen = np.full((users, INTERESTS), -MIN_GAP - 1)
    slots = np.empty((users, steps), dtype=np.int64)
    rows = np.arange(users)
    for t in range(steps):
        score = rng.random((users, INTERESTS))
        score[last_seen >= t - MIN_GAP] = -1.0
        pick = score.argmax(axis=1)
        slots[:, t] = pick
        last_seen[rows, pick] = t
    return slots


def _item_in_category(rng: np.random.Generator, cat: np.ndarray, items: int,
                      categories: int) -> np.ndarray:
    per_cat = (items - 1 - cat) // categories + 1  # items i <= items with (i-1) % C == cat
    rank = np.floor(rng.random(cat.shape) * per_cat).astype(np.int64)
    return cat + 1 + categories * rank


def _click_model(positive_rate: float) -> tuple[int, float]:
    """(mean liked interests per user, click prob on them) so the overall rate is
    `positive_rate`."""
    liked = round(INTERESTS * (positive_rate - P_DISLIKED) / (P_LIKED_TARGET - P_DISLIKED))
    liked = min(max(liked, 1), INTERESTS - 1)
    share = liked / INTERESTS
    return liked, (positive_rate - (1 - share) * P_DISLIKED) / share
