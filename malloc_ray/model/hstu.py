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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
        dist = q_pos[:, :, None] - k_pos[:, None, :]
        return self.table(relative_bucket(dist, self.num_buckets, self.max_distance)).permute(0, 3, 1, 2)


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
    """HSTU attention as `pointwise_attention_reference` computes it, with the same matmuls.

    Without autograd (evaluation, serving) the (B,H,Nq,Nk) score tensor is the cost: the
    reference allocates five of them. Here the same ops, in the same order, run in place on
    one buffer, so the result is bitwise the reference's. Training keeps the reference, whose
    intermediates autograd needs.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
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
