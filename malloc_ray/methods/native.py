"""Native: the full KV cache (docs/methods/native.md).

Per layer and user it keeps K and V of every history token, (H, N_c, d_h) each, plus their
positions. A request runs only the new tokens through the layer and attends over
[cached K,V ; own k,v]. Exact: it equals recomputing the whole sequence (w/o Mem).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import LayerMemory, Method, TestSetting, register
from malloc_ray.model.hstu import (HSTUConfig, RelativeBias, merge_heads, pointwise_attention,
                                   split_heads, visibility)


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


class HSTUAttention(Method):
    """The standard HSTU mixer: u,q,k,v = SiLU(f1(x)); y = u * LN(SiLU(QK^T + rab)/n . V)."""

    def __init__(self, cfg: HSTUConfig, hp=None):
        super().__init__(cfg, hp)
        D = cfg.d_model
        self.f1 = nn.Linear(cfg.d_model, 4 * D, bias=False)
        self.rab = RelativeBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance)
        self.out_norm = nn.LayerNorm(D)

    def project(self, x):
        u, q, k, v = self.f1(x).chunk(4, dim=-1)
        u = F.silu(u)
        if self.cfg.silu_qkv:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        h = self.cfg.num_heads
        return u, split_heads(q, h), split_heads(k, h), split_heads(v, h)

    def attend(self, u, q, k, v, q_pos, k_pos, k_valid, same):
        mask = visibility(q_pos, k_pos, k_valid, same)
        av = pointwise_attention(q, k, v, self.rab(q_pos, k_pos), mask, self.cfg.divisor)
        return u * self.out_norm(merge_heads(av))

    def forward(self, x, pos, valid):
        u, q, k, v = self.project(x)
        same = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        return self.attend(u, q, k, v, pos, pos, valid, same)


@register
class Native(HSTUAttention):
    name = "native"
    category = "none"
    lossless = True  # it is the reference
    # Nothing to compress; ragged lengths so the cache holds left-padded users of all sizes.
    test_settings = (TestSetting(id="ragged", hparams={}, lengths=(23, 9, 5, 17, 23, 12)),)

    def prefill(self, x, pos, valid):
        u, q, k, v = self.project(x)
        same = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        y = self.attend(u, q, k, v, pos, pos, valid, same)
        return y, LayerMemory(payload={"k": k, "v": v},
                              metadata={"pos": pos.to(torch.int32), "valid": valid})

    def step(self, x, pos, memory, append):
        u, q, k, v = self.project(x)
        mem = memory.payload
        keys, values = torch.cat([mem["k"], k], 2), torch.cat([mem["v"], v], 2)
        k_pos = torch.cat([memory.metadata["pos"].to(pos.dtype), pos], 1)
        k_valid = torch.cat([memory.metadata["valid"], torch.ones_like(pos, dtype=torch.bool)], 1)
        n_old, n_new = mem["k"].shape[2], x.shape[1]
        same = torch.cat([torch.zeros(n_new, n_old, dtype=torch.bool, device=x.device),
                          torch.eye(n_new, dtype=torch.bool, device=x.device)], 1)
        y = self.attend(u, q, keys, values, pos, k_pos, k_valid, same)
        if append:
            memory = LayerMemory(payload={"k": keys, "v": values},
                                 metadata={"pos": k_pos.to(torch.int32), "valid": k_valid})
        return y, memory

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        payload = 2 * n_cached * cfg.d_model * 4           # K and V, fp32
        return payload + (n_cached * (4 + 1) if metadata else 0)  # int32 position + bool valid

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, tok_mm = token_macs(cfg)
        pair, pair_mm = pair_macs(cfg)
        keys = n_cached + q  # dense: every candidate row is computed against every key
        return {"request": q * tok + q * keys * pair,
                "request_matmul": q * tok_mm + q * keys * pair_mm,
                "prefill": n_cached * tok + n_cached * n_cached * pair}
