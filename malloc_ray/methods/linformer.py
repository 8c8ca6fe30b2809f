"""Linformer (docs/methods/linformer.md): keys and values projected along time. See the class docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import Method, TestSetting, register
from malloc_ray.methods.common.glue import (check_bool, check_int, layer_macs, macs_dict,
                                            pair_macs, pointwise_weights, token_macs)
from malloc_ray.model.hstu import HSTUConfig, merge_heads, split_heads


def slots(cfg: HSTUConfig, hp) -> int:
    """Projected length: k, clipped to N = 2 max_len."""
    return min(hp.k, 2 * cfg.max_len)


@register
class Linformer(Method):
    """Linformer: keys and values projected along time to k slots (docs/methods/linformer.md).

    A learned E (N x k, N = 2 max_len; `share_kv` uses it for K and V, else a second F) mixes the
    sequence's keys into k projected keys, K~ = sum_j E[pos_j] k_j (same for V), and every query
    attends to those k slots: y = u * LN(SiLU(q K~^T) / n . V~). Nothing is kept per user
    (recompute, as in the paper): a request re-runs [history; candidates].

    Adapted to the interleaved CTR sequence, and why:
    - Causal by default. Projecting the whole sequence (the paper, `causal=False`) mixes y_t and
      every later label into every key, so under `loss_positions=all` item i_t reads its own label
      (label leakage: the tests show it). The causal variant gives each query its own projection of
      the prefix it may see: K~_p = sum over keys visible to p (earlier positions and itself) of
      E[pos_j] k_j - exactly the paper's Linformer applied to that prefix, whose shorter-sequence
      rule (use the first rows of E) it shares. It is a prefix sum of the outer products
      E[pos_j]^T k_j, so it costs N k D per projection like the paper's, but keeps a (k, d_h)
      state per query (activation memory N k D per layer). Candidates sharing the last position
      each see the history and themselves, not each other (ties take the prefix before the tie).
    - E rows are aligned by absolute token position (row j belongs to position j), so left padding
      never shifts them, and padding keys and values are zeroed before projecting. Positions must be
      < N (a window of at most max_len interactions).
    - No relative bias: projected slots have no position. E carries the position information.
    - k larger than N is clipped to N (a projection cannot have more slots than rows).
    - The divisor stays n = 2 max_len (the model's convention; out_norm removes the scale anyway).
    """

    name = "linformer"
    category = "sequence"
    recompute = True

    @dataclass(frozen=True)
    class Hparams:
        k: int = 25              # projected length (paper-fit: 0.1 x 256)
        share_kv: bool = True    # one E for keys and values
        causal: bool = True      # False: the paper's projection of the whole sequence (leaks)

        def __post_init__(self):
            check_int("k", self.k, 1)
            check_bool("share_kv", self.share_kv)
            check_bool("causal", self.causal)

    batched_append = True  # appending k at once = k single appends (contract test)
    # 7 slots for up to 61 tokens (the default 25 is close to short test sequences).
    test_settings = (TestSetting(id="k7", hparams={"k": 7}, lengths=(31, 8, 14, 21)),)

    def __init__(self, cfg: HSTUConfig, hp=None):
        super().__init__(cfg, hp)
        D, n, k = cfg.d_model, 2 * cfg.max_len, slots(cfg, self.hp)
        self.f1 = nn.Linear(cfg.d_model, 4 * D, bias=False)
        self.out_norm = nn.LayerNorm(D)
        bound = 1 / math.sqrt(k)  # lucidrains' init: uniform(+-1/sqrt(k))
        self.proj_k = nn.Parameter(torch.empty(n, k).uniform_(-bound, bound))
        self.proj_v = (None if self.hp.share_kv
                       else nn.Parameter(torch.empty(n, k).uniform_(-bound, bound)))

    def rows(self, proj, pos, valid):
        """E rows of each token, (B, N, k); padding rows are zero."""
        return proj[pos.clamp(min=0)] * valid[..., None]

    def forward(self, x, pos, valid):
        n_rows = self.proj_k.shape[0]
        if bool((pos.masked_fill(~valid, 0) >= n_rows).any()):
            raise ValueError(f"linformer: positions must be < 2 max_len = {n_rows}")
        u, q, k, v = F.silu(self.f1(x)).chunk(4, dim=-1)
        h = self.cfg.num_heads
        q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
        e_k = self.rows(self.proj_k, pos, valid)
        e_v = e_k if self.proj_v is None else self.rows(self.proj_v, pos, valid)
        if self.hp.causal:
            if bool((pos[:, 1:] < pos[:, :-1]).any()):
                raise ValueError("linformer: positions must be non-decreasing along the sequence")
            first = torch.searchsorted(pos.contiguous(), pos.contiguous())  # first of a tie
            keys, values = self.prefix(e_k, k, first), self.prefix(e_v, v, first)
            scores = torch.matmul(q[..., None, :], keys.transpose(-1, -2))   # (B, H, N, 1, k)
            av = torch.matmul(pointwise_weights(scores, None, self.cfg.divisor), values)[..., 0, :]
        else:
            keys = torch.matmul(e_k.transpose(1, 2)[:, None], k)            # (B, H, k, dh)
            values = torch.matmul(e_v.transpose(1, 2)[:, None], v)
            scores = torch.matmul(q, keys.transpose(-1, -2))                 # (B, H, N, k)
            av = torch.matmul(pointwise_weights(scores, None, self.cfg.divisor), values)
        return u * self.out_norm(merge_heads(av))

    @staticmethod
    def prefix(e, x, first):
        """Per query p: sum over keys at earlier positions, plus itself, of E[pos_j]^T x_j.

        e (B, N, k), x (B, H, N, dh), first (B, N) the index of the first token at p's
        position -> (B, H, N, k, dh). Requires positions non-decreasing along the sequence.
        """
        outer = torch.matmul(e[:, None, :, :, None], x[:, :, :, None, :])  # (B, H, N, k, dh)
        if bool((first == torch.arange(first.shape[1], device=first.device)).all()):
            return outer.cumsum(2)  # no tied positions (training)
        before = torch.cat([torch.zeros_like(outer[:, :, :1]), outer[:, :, :-1].cumsum(2)], 2)
        index = first[:, None, :, None, None].expand_as(outer)
        return before.gather(2, index) + outer

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        """A request re-runs N = n_cached + q tokens: projecting K and V costs N k D each (an
        outer product per token, accumulated by the prefix sum), then N queries x k slots."""
        n, k, D = n_cached + q, slots(cfg, hp), cfg.d_model
        project = 2 * n * k * D
        return macs_dict(layer_macs(token_macs(cfg), pair_macs(cfg), n, n * k, (project, project)),
                         (0, 0))
