"""HSTU building blocks: relative bias, visibility mask, pointwise attention, the block.

This is the plain, obviously-correct reference every memory method builds on (the ArkHSTU
variant of HSTU that MALLOC uses, see docs/model.md):

    block(x) = x + dropout(f2(mixer(LN(x))))
    mixer    = u * LN(A V),  A = SiLU(Q K^T + rab) / n  (masked),  u,q,k,v = SiLU(f1(.))

The *mixer* is the memory method (malloc_ray.methods): it owns f1, the attention and what is
kept per user. Attention is written as explicit `torch.matmul` so that
`torch.utils.flop_counter` counts it (SDPA would count as 0).

Two choices that make caching exact (docs/model.md):
- the divisor n is a constant (2 * max_len), never the padded length of the batch;
- the bias depends only on absolute token positions, so appending tokens never changes it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.model import fast_attention

# No-grad attention over at least this many (query, key) pairs takes the blocked path.
BLOCKED_MIN_PAIRS = 256 * 256


@dataclass(frozen=True)
class HSTUConfig:
    """Shape of the backbone. `max_len` counts interactions per window, target included."""

    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    max_len: int = 128
    dropout: float = 0.1
    num_buckets: int = 32
    max_distance: int = 128
    silu_qkv: bool = True   # ArkHSTU: SiLU on u,q,k,v; False: on u only (production HSTU)
    # The label token y_t also carries its item's embedding, so one attention hop can match a
    # target against earlier (item, label) pairs; False is ArkHSTU's label-only token.
    label_carries_item: bool = True

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        for name in ("d_model", "num_heads", "num_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def divisor(self) -> float:
        # Fixed 1/n: the same user must get the same score in any batch and from any cache.
        return float(2 * self.max_len)


def relative_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5 one-directional buckets: exact below num_buckets/2, log-spaced up to max_distance."""
    exact = num_buckets // 2
    distance = distance.clamp(min=0)
    far = exact + (
        torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
        * (num_buckets - exact)
    ).long()
    far = far.clamp(max=num_buckets - 1)
    return torch.where(distance < exact, distance, far)


@functools.lru_cache(maxsize=None)
def _distance_buckets(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """relative_bucket of the distances 0..max_distance (a plain tensor, usable in any mode)."""
    with torch.inference_mode(False):
        return relative_bucket(torch.arange(max_distance + 1, device=device),
                               num_buckets, max_distance)


class RelativeBias(nn.Module):
    """One learned scalar per (distance bucket, head); distance = query pos - key pos."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (B, Nq), k_pos (B, Nk) -> bias (B or 1, H, Nq, Nk)."""
        q_pos, k_pos = q_pos.long(), k_pos.long()
        # Left padding shifts a row's query and key positions alike, so distances usually
        # agree across the batch: gather once (the gather's backward dominates otherwise).
        # Rows agree exactly when each row is row 0 shifted by one offset for queries and
        # keys alike; checking that is O(B·N), not O(B·Nq·Nk).
        shift = q_pos[:, :1] - q_pos[:1, :1]
        if q_pos.shape[1] and bool((q_pos - q_pos[:1] == shift).all()
                                   and (k_pos - k_pos[:1] == shift).all()):
            q_pos, k_pos = q_pos[:1], k_pos[:1]
        if q_pos.shape[0] == 1 and _consecutive(q_pos[0]) and _consecutive(k_pos[0]):
            return self._consecutive_bias(int(q_pos[0, 0]) - int(k_pos[0, 0]),
                                          q_pos.shape[1], k_pos.shape[1])
        # Buckets are one-directional: 0 for distance <= 0, num_buckets - 1 from max_distance
        # on. So the distance, clamped to [0, max_distance], indexes a (H, max_distance + 1)
        # table of the buckets' biases: no per-pair bucketing, and the gather writes the
        # (B, H, Nq, Nk) layout the attention reads (its backward is an index_add over the
        # small table). Same values as bucketing every pair (tests/test_attention_paths.py).
        dist = (q_pos.to(torch.int32)[:, :, None] - k_pos.to(torch.int32)[:, None, :])
        dist = dist.clamp_(0, self.max_distance)
        by_distance = self.table(_distance_buckets(self.num_buckets, self.max_distance,
                                                   dist.device)).t()  # (H, max_distance + 1)
        b, nq, nk = dist.shape
        bias = by_distance.index_select(1, dist.view(-1)).view(-1, b, nq, nk)
        return bias.transpose(0, 1)

    def _consecutive_bias(self, offset: int, nq: int, nk: int) -> torch.Tensor:
        """Queries at offset + k_pos[0] + i, keys at k_pos[0] + j: the bias depends on i - j
        only, one column per diagonal (fast_attention.ToeplitzExpand)."""
        device = self.table.weight.device
        diagonal = torch.arange(nq + nk - 1, device=device) + (offset - nk + 1)  # i - j + offset
        by_distance = self.table(_distance_buckets(self.num_buckets, self.max_distance, device))
        by_diagonal = by_distance.t().index_select(1, diagonal.clamp_(0, self.max_distance))
        if torch.is_grad_enabled() and by_diagonal.requires_grad:
            return fast_attention.ToeplitzExpand.apply(by_diagonal, nq, nk)
        return fast_attention.toeplitz(by_diagonal, nq, nk).unsqueeze(0)


def _consecutive(pos: torch.Tensor) -> bool:
    """pos (N,) is p0, p0 + 1, ..., p0 + N - 1."""
    n = pos.shape[0]
    return n > 0 and bool((pos - pos[0] == torch.arange(n, device=pos.device)).all())


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
               same: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees: (B, 1, Nq, Nk) bool.

    A query sees valid keys at strictly earlier positions, and itself (`same`, (Nq, Nk)).
    With interleaved tokens i_t at 2t and y_t at 2t+1 this is causal and never shows y_t to
    i_t. Candidates of one request share a position, so they see the history and themselves
    but not each other (the target-aware mask); appended interactions have increasing
    positions, so they are causal among themselves. No separate flag is needed.
    """
    earlier = k_pos[:, None, :] < q_pos[:, :, None]
    return ((earlier | same[None]) & k_valid[:, None, :])[:, None]


def pointwise_attention_reference(q, k, v, bias, mask, divisor: float) -> torch.Tensor:
    """Reference HSTU attention. q (B,H,Nq,dh), k/v (B,H,Nk,dh) -> (B,H,Nq,dh)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias
    weights = F.silu(scores) / divisor
    weights = weights * mask  # pointwise, not softmax: masked weights are exactly 0
    return torch.matmul(weights, v)


def pointwise_attention(q, k, v, bias, mask, divisor: float) -> torch.Tensor:
    """HSTU attention: `pointwise_attention_reference`'s result, without its (B,H,Nq,Nk) tensors.

    - Training (a gradient is needed) on CPU: `fast_attention.PointwiseAttention`, which
      processes the queries in blocks, skips the key columns the mask hides from a whole
      block, and recomputes the scores in backward instead of keeping them. Equal to the
      reference up to rounding (tests/test_fast_attention.py).
    - No gradient, long inputs (Nq * Nk >= BLOCKED_MIN_PAIRS): the same blocked forward.
    - No gradient, short inputs: the reference's ops, in its order, in place on one buffer,
      so the result is bitwise the reference's (tests/test_attention_paths.py).
    Inputs the blocked path does not handle (not on CPU, not 4-D, a non-bool mask, ...) take
    the paths as before (reference; in place without grad).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    if fast_attention.supported(q, k, v, bias, mask) and (
            needs_grad or q.shape[-2] * k.shape[-2] >= BLOCKED_MIN_PAIRS):
        return fast_attention.pointwise_attention_fast(q, k, v, bias, mask, divisor)
    shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], k.shape[-2])
    if (needs_grad or q.dtype != bias.dtype or q.dtype != k.dtype
            or torch.broadcast_shapes(shape, bias.shape, mask.shape) != shape):
        return pointwise_attention_reference(q, k, v, bias, mask, divisor)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores += bias
    F.silu(scores, inplace=True)
    scores /= divisor
    scores.mul_(mask)
    return torch.matmul(scores, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, dim = x.shape
    return x.view(b, n, heads, dim // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class HSTUBlock(nn.Module):
    """Residual wrapper around one memory method (the mixer)."""

    def __init__(self, cfg: HSTUConfig, mixer: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.mixer = mixer
        self.f2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, valid):
        return x + self.drop(self.f2(self.mixer(self.norm(x), pos, valid)))

    def prefill(self, x, pos, valid):
        y, memory = self.mixer.prefill(self.norm(x), pos, valid)
        return x + self.f2(y), memory

    def step(self, x, pos, memory, append: bool):
        y, memory = self.mixer.step(self.norm(x), pos, memory, append)
        return x + self.f2(y), memory
