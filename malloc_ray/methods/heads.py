"""GQA and MQA: query heads share K,V heads (docs/methods/gqa.md).

GQA keeps `kv_heads` K,V heads per layer instead of `num_heads`; query head h reads K,V head
h // (num_heads / kv_heads) (the `repeat_kv` / repeat-interleave convention). MQA is GQA with a
single K,V head: its own registry entry and name, the same code with `kv_heads` fixed to 1.

Only the K and V parts of f1 shrink (d -> 2D + 2·kv_heads·d_h); u, q, SiLU on all four streams,
the per-query-head T5 bias, the fixed divisor and the target-aware mask are Native's. Serving is
Native's too (prefill keeps K,V and positions; a request attends over [cached K,V; own k,v]),
only the cached K,V are kv_heads wide. With kv_heads = num_heads GQA *is* Native: same module
names and shapes, so Native's weights load into it and give the same outputs (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.errors import InputError
from malloc_ray.methods.base import NoHparams, TestSetting, register
from malloc_ray.methods.common.glue import (check_int, layer_macs, macs_dict, pair_macs,
                                            pointwise_weights)
from malloc_ray.methods.native import Native
from malloc_ray.model.hstu import merge_heads, split_heads, visibility


def grouped_attention(q, k, v, bias, mask, divisor: float) -> torch.Tensor:
    """Pointwise HSTU attention where G = H / H_kv query heads share each K,V head.

    q (B, H, Nq, dq), k (B, H_kv, Nk, dq), v (B, H_kv, Nk, dv), bias (B, H, Nq, Nk),
    mask (B, 1, Nq, Nk) -> (B, H, Nq, dv). The G query heads of a group are stacked as extra
    query rows of their K,V head, so K and V are never copied H / H_kv times (which is what
    makes sharing cheap to serve) while the matmul work per query head stays that of MHA.
    Query head h uses K,V head h // G. With H_kv = H this is `pointwise_attention` op for op.
    """
    b, h, nq, _ = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    rows = q.reshape(b, h_kv, (h // h_kv) * nq, q.shape[-1])  # heads h_kv*G..: consecutive
    scores = torch.matmul(rows, k.transpose(-1, -2)).view(b, h, nq, nk) + bias
    weights = pointwise_weights(scores, mask, divisor)  # bias and mask stay per query head
    out = torch.matmul(weights.reshape(b, h_kv, -1, nk), v)
    return out.view(b, h, nq, v.shape[-1])


@register
class GQA(Native):
    """Grouped-query attention: `kv_heads` K,V heads, each shared by num_heads / kv_heads query
    heads. Trained from scratch (as in the paper: the K,V projection itself is smaller).

    Not adapted beyond what HSTU needs: SiLU stays on k and v (it is applied per token before
    caching, so sharing is unaffected), and the relative bias is per query head, as in §4.2.
    """

    name = "gqa"
    category = "head"
    lossless = False  # fewer K,V heads (kv_heads = num_heads would be Native itself)
    batched_append = True  # appending k at once = k single appends (contract test)
    # The default 4 equals the tiny model's 4 heads (no sharing): 2 and 1 K,V heads.
    test_settings = (TestSetting(id="kv2", hparams={"kv_heads": 2}, lengths=(19, 7, 12, 19, 4)),
                     TestSetting(id="kv1", hparams={"kv_heads": 1}, lengths=(19, 7, 12, 19, 4)))

    @dataclass(frozen=True)
    class Hparams:
        kv_heads: int = 4  # paper fit: 4 of 8 heads -> 63.94 MiB (docs/methods/gqa.md)

        def __post_init__(self):
            check_int("kv_heads", self.kv_heads, 1)

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)
        self.kv_heads = self.kv_heads_for(cfg, self.hp)
        D, kv_width = cfg.d_model, self.kv_heads * cfg.head_dim
        # Replaces Native's d -> 4D: u and q keep D each, k and v shrink to kv_heads heads.
        self.f1 = nn.Linear(cfg.d_model, 2 * D + 2 * kv_width, bias=False)

    @classmethod
    def kv_heads_for(cls, cfg, hp) -> int:
        """K,V heads for this config; they must divide the query heads evenly."""
        if cfg.num_heads % hp.kv_heads:
            raise InputError(f"kv_heads={hp.kv_heads} must divide num_heads={cfg.num_heads}",
                             key="kv_heads")
        return hp.kv_heads

    def project(self, x):
        D, kv_width = self.cfg.d_model, self.kv_heads * self.cfg.head_dim
        u, q, k, v = F.silu(self.f1(x)).split([D, D, kv_width, kv_width], dim=-1)
        return (u, split_heads(q, self.cfg.num_heads), split_heads(k, self.kv_heads),
                split_heads(v, self.kv_heads))

    def attend(self, u, q, k, v, q_pos, k_pos, k_valid, same):
        # Native's prefill/step call this with the cached (and own) k, v of kv_heads heads.
        mask = visibility(q_pos, k_pos, k_valid, same)
        av = grouped_attention(q, k, v, self.rab(q_pos, k_pos), mask, self.cfg.divisor)
        return u * self.out_norm(merge_heads(av))

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        payload = 2 * n_cached * cls.kv_heads_for(cfg, hp) * cfg.head_dim * 4  # K and V, fp32
        return payload + (n_cached * (4 + 1) if metadata else 0)  # int32 position + bool valid

    @classmethod
    def token_macs(cls, cfg, hp) -> tuple[int, int]:
        """(all, matmul-only) per token per layer outside the attention pairs: Native's
        `token_macs` with f1 and its SiLU at width 2D + 2·kv_heads·d_h."""
        d = D = cfg.d_model
        f1_out = 2 * D + 2 * cls.kv_heads_for(cfg, hp) * cfg.head_dim
        matmul = d * f1_out + D * d
        return matmul + f1_out + 2 * d + 2 * D + d, matmul

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok = cls.token_macs(cfg, hp)
        pair = pair_macs(cfg)  # per query head unchanged: 2·d_h·H + H
        keys = n_cached + q
        return macs_dict(layer_macs(tok, pair, q, q * keys),
                         layer_macs(tok, pair, n_cached, n_cached * n_cached))


@register
class MQA(GQA):
    """Multi-query attention: GQA specialised to one K,V head shared by all query heads.

    A separate registry entry because the paper reports it as its own method; it has no
    hyperparameters (kv_heads is 1 by definition) and otherwise runs GQA's code unchanged.
    """

    name = "mqa"
    Hparams = NoHparams
    batched_append = True  # appending k at once = k single appends (contract test)
    test_settings = (TestSetting(id="kv1", hparams={}, lengths=(19, 7, 12, 19, 4)),)

    @classmethod
    def kv_heads_for(cls, cfg, hp) -> int:
        return 1

