"""The glue every method repeated, written once (tests/test_method_helpers.py checks each).

Each helper is the exact op sequence the methods typed out before, in the same order, so a
method built on it computes the same numbers bit for bit. The serving helpers below
`pointwise_weights` (two-part attention sums, the distance-indexed bias, appending into spare
capacity) are new ways to compute the same request, equal to the concatenating reference up
to rounding (tests/test_cached_request.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import LayerMemory
from malloc_ray.model.hstu import HSTUConfig, RelativeBias, relative_bucket


# -- hyperparameter checks (for `Hparams.__post_init__`) ------------------------------------
def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """An int in [low, high]. bool is an int subclass: `window: true` in a YAML would
    silently mean 1, so it is refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_bool(name: str, value) -> None:
    """A real bool: a flag given as 1 or "yes" is a typo, not a choice."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


# -- attention ------------------------------------------------------------------------------
def pointwise_weights(scores: torch.Tensor, mask: torch.Tensor | None,
                      divisor: float) -> torch.Tensor:
    """HSTU's weights A = SiLU(scores) / n, masked (None: unmasked), no softmax.

    The ops of `hstu.pointwise_attention_reference`, in its order, for the methods that build
    the scores their own way (chunks, groups, buckets) or need the weights themselves.
    """
    weights = F.silu(scores) / divisor
    return weights if mask is None else weights * mask


def pointwise_sum(q, k, v, bias, mask) -> torch.Tensor:
    """sum_j SiLU(q . k_j + bias_j) * mask_j * v_j over the keys given, NOT divided by n.

    HSTU's weights have no softmax, so attention over [cache; new tokens] is the sum of this
    over the cache and over the new tokens, divided by n once: a request never concatenates
    (copies) the cache. q (B, H, Nq, dq), k (B, H_kv, Nk, dq), v (B, H_kv, Nk, dv), bias
    (B, H, Nq, Nk), mask (B, 1, Nq, Nk) -> (B, H, Nq, dv). H_kv may divide H (GQA, MQA): the
    H / H_kv query heads of a K,V head are stacked as its query rows (as `grouped_attention`).
    """
    b, h, nq, _ = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    rows = q if h_kv == h else q.reshape(b, h_kv, (h // h_kv) * nq, q.shape[-1])
    scores = torch.matmul(rows, k.transpose(-1, -2)).view(b, h, nq, nk) + bias
    weights = F.silu(scores) * mask
    if h_kv != h:
        weights = weights.reshape(b, h_kv, -1, nk)
    return torch.matmul(weights, v).view(b, h, nq, v.shape[-1])


@functools.lru_cache(maxsize=None)
def _distance_buckets(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a plain tensor, usable in any mode later
        return relative_bucket(torch.arange(max_distance + 1, device=device),
                               num_buckets, max_distance)


def distance_table(rab: RelativeBias, device) -> torch.Tensor:
    """rab's bias per distance 0..max_distance, (max_distance + 1, H).

    One-directional buckets are 0 for distances <= 0 and constant (num_buckets - 1) from
    max_distance on, so a clamped distance indexes this table exactly as `rab` buckets it.
    """
    return rab.table(_distance_buckets(rab.num_buckets, rab.max_distance, torch.device(device)))


def distance_bias(rab: RelativeBias, dist: torch.Tensor,
                  table: torch.Tensor | None = None) -> torch.Tensor:
    """rab's bias at distances dist = query pos - key pos (B, Nq, Nk) -> (B, H, Nq, Nk): the
    numbers of `rab(q_pos, k_pos)`, looked up in `distance_table` (pass it to reuse it)
    instead of bucketing every pair."""
    if table is None:
        table = distance_table(rab, dist.device)
    return F.embedding(dist.clamp(0, rab.max_distance), table).permute(0, 3, 1, 2)


def self_mask(n_new: int, n_old: int, device) -> torch.Tensor:
    """`same` (n_new, n_old + n_new) for n_new query tokens placed after n_old kept keys:
    each query is its own key (candidates share a position, so `visibility` needs this)."""
    return torch.cat([torch.zeros(n_new, n_old, dtype=torch.bool, device=device),
                      torch.eye(n_new, dtype=torch.bool, device=device)], 1)


def join_cached(mem_pos: torch.Tensor, mem_valid: torch.Tensor, pos: torch.Tensor):
    """Key positions and validity of [kept tokens; own tokens], and the `same` mask.

    mem_pos, mem_valid (B, M) as stored, or (B, H, M) when each head keeps its own tokens;
    pos (B, N) the new tokens' positions (they are all valid). Every cached method's `step`
    attends over exactly these keys.
    """
    own = pos if mem_pos.dim() == 2 else pos[:, None].expand(*mem_pos.shape[:2], pos.shape[1])
    k_pos = torch.cat([mem_pos.to(pos.dtype), own], -1)
    k_valid = torch.cat([mem_valid, torch.ones_like(own, dtype=torch.bool)], -1)
    return k_pos, k_valid, self_mask(pos.shape[1], mem_pos.shape[-1], pos.device)


def token_memory(payload: dict[str, torch.Tensor], pos: torch.Tensor,
                 valid: torch.Tensor) -> LayerMemory:
    """A memory of per-token payload plus each token's position (int32, the 4 bytes that
    `memory_bytes` counts) and validity flag: what Native-like caches keep."""
    return LayerMemory(payload=payload, metadata={"pos": pos.to(torch.int32), "valid": valid})


class TokenRoom:
    """Preallocated per-token tensors with room to append in place (capacity doubling).

    `full[name]` has `capacity` tokens along `axes[name]`; the newest memory made from it uses
    the first `end`. Older memories are views of a shorter prefix, which appending never
    rewrites: only a memory whose length is `end` may write after it (others copy first).
    Appends to one user's memory from two threads at once are not supported.
    """

    def __init__(self, full: dict[str, torch.Tensor], axes: dict[str, int], end: int):
        self.full, self.axes, self.end = full, axes, end

    @property
    def capacity(self) -> int:
        name = next(iter(self.full))
        return self.full[name].shape[self.axes[name]]

    def used(self, name: str, n: int) -> torch.Tensor:
        return self.full[name].narrow(self.axes[name], 0, n)


@dataclass
class TokenMemory(LayerMemory):
    """A LayerMemory whose payload and metadata are the used part (views) of a `TokenRoom`.

    `nbytes` counts the views, i.e. the tokens kept, not the spare capacity.
    """

    room: TokenRoom | None = field(default=None, repr=False, compare=False)


def empty_grown(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """An uninitialised tensor shaped like t but `size` long along `axis`, with t's order of
    dimensions in memory (a K stored as (B, H, d_h, N) stays so: see Native.prefill)."""
    order = sorted(range(t.dim()), key=t.stride, reverse=True)  # outermost dimension first
    shape = [size if d == axis else t.shape[d] for d in order]
    return t.new_empty(shape).permute(*(order.index(d) for d in range(t.dim())))


def append_tokens(memory: LayerMemory, payload: dict[str, torch.Tensor],
                  metadata: dict[str, torch.Tensor], axes: dict[str, int]) -> TokenMemory:
    """`memory` plus new tokens (each tensor's token axis in `axes`), written in place into
    spare capacity where there is some; otherwise into a fresh room of twice the new length.

    The result equals concatenating old and new tensors along their token axes; `memory`
    itself is left as it was. With autograd recording, it simply concatenates (no in-place
    writes into tensors a graph may have saved).
    """
    old = {**memory.payload, **memory.metadata}
    new = {**payload, **metadata}
    name = next(iter(new))
    n, m = old[name].shape[axes[name]], new[name].shape[axes[name]]
    if torch.is_grad_enabled():
        joined = {key: torch.cat([old[key].to(t.dtype), t], axes[key]) for key, t in new.items()}
        return TokenMemory({key: joined[key] for key in payload},
                           {key: joined[key] for key in metadata})
    room = getattr(memory, "room", None)
    reusable = (room is not None and room.end == n and n + m <= room.capacity
                and (torch.is_inference_mode_enabled()
                     or not room.full[name].is_inference()))
    if not reusable:
        full = {}
        for key, t in new.items():
            full[key] = empty_grown(old[key].to(t.dtype), axes[key], 2 * (n + m))
            full[key].narrow(axes[key], 0, n).copy_(old[key])
        room = TokenRoom(full, dict(axes), n)
    for key, t in new.items():
        room.full[key].narrow(axes[key], n, m).copy_(t)
    room.end = n + m
    return TokenMemory({key: room.used(key, n + m) for key in payload},
                       {key: room.used(key, n + m) for key in metadata}, room)


def hstu_layers(cfg: HSTUConfig, f1_width: int):
    """Native's f1 (d -> f1_width, no bias), relative bias and output LayerNorm, created in
    this order: the order a seed draws Native's weights in, kept by the methods reusing them."""
    return (nn.Linear(cfg.d_model, f1_width, bias=False),
            RelativeBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance),
            nn.LayerNorm(cfg.d_model))


# -- costs ----------------------------------------------------------------------------------
def token_macs(cfg: HSTUConfig) -> tuple[int, int]:
    """(all counted ops, matmul-only) MACs per token per layer outside the attention pairs.

    f1 d->4D (no bias), SiLU on 4D, two LayerNorms (2 ops per element), f2 D->d with bias.
    Gating, bias adds and residuals are elementwise and not counted (ptflops convention).
    """
    d = D = cfg.d_model
    matmul = d * 4 * D + D * d
    return matmul + 4 * D + 2 * d + 2 * D + d, matmul


def pair_macs(cfg: HSTUConfig) -> tuple[int, int]:
    """(all, matmul-only) MACs per (query, key) pair per layer: QK^T, SiLU per head, A.V."""
    D, H = cfg.d_model, cfg.num_heads
    return 2 * D + H, 2 * D


def layer_macs(tok: tuple[int, int], pair: tuple[int, int], tokens: int, pairs: int,
               extra: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(all, matmul-only) MACs of `tokens` token rows and `pairs` (query, key) pairs at the
    per-token and per-pair costs `tok` and `pair`, plus `extra` (all, matmul)."""
    return (tokens * tok[0] + pairs * pair[0] + extra[0],
            tokens * tok[1] + pairs * pair[1] + extra[1])


def macs_dict(request: tuple[int, int], prefill: tuple[int, int],
              prefill_matmul: bool = False) -> dict[str, int]:
    """`Method.macs`'s dict from (all, matmul-only) counts of a request and of prefill;
    `prefill_matmul` adds prefill's matmul count (the methods whose prefill is not a plain
    forward report it)."""
    out = {"request": request[0], "request_matmul": request[1], "prefill": prefill[0]}
    if prefill_matmul:
        out["prefill_matmul"] = prefill[1]
    return out
