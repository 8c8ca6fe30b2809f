"""Native: the full KV cache (docs/methods/native.md).

Per layer and user it keeps K and V of every history token, (H, N_c, d_h) each, plus their
positions. A request runs only the new tokens through the layer and attends over
[cached K,V ; own k,v]. Exact: it equals recomputing the whole sequence (w/o Mem).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malloc_ray.methods.base import Method, TestSetting, register
from malloc_ray.methods.common.glue import (hstu_layers, join_cached, layer_macs, macs_dict,
                                            pair_macs, self_mask, token_macs, token_memory)
from malloc_ray.model.hstu import (HSTUConfig, merge_heads, pointwise_attention, split_heads,
                                   visibility)


class HSTUAttention(Method):
    """The standard HSTU mixer: u,q,k,v = SiLU(f1(x)); y = u * LN(SiLU(QK^T + rab)/n . V)."""

    def __init__(self, cfg: HSTUConfig, hp=None):
        super().__init__(cfg, hp)
        self.f1, self.rab, self.out_norm = hstu_layers(cfg, 4 * cfg.d_model)  # u, q, k, v

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
        return self.attend(u, q, k, v, pos, pos, valid, self_mask(x.shape[1], 0, x.device))


@register
class Native(HSTUAttention):
    name = "native"
    category = "none"
    lossless = True  # it is the reference
    # Nothing to compress; ragged lengths so the cache holds left-padded users of all sizes.
    test_settings = (TestSetting(id="ragged", hparams={}, lengths=(23, 9, 5, 17, 23, 12)),)

    def prefill(self, x, pos, valid):
        u, q, k, v = self.project(x)
        y = self.attend(u, q, k, v, pos, pos, valid, self_mask(x.shape[1], 0, x.device))
        return y, token_memory({"k": k, "v": v}, pos, valid)

    def step(self, x, pos, memory, append):
        u, q, k, v = self.project(x)
        mem = memory.payload
        keys, values = torch.cat([mem["k"], k], 2), torch.cat([mem["v"], v], 2)
        k_pos, k_valid, same = join_cached(memory.metadata["pos"], memory.metadata["valid"], pos)
        y = self.attend(u, q, keys, values, pos, k_pos, k_valid, same)
        if append:
            memory = token_memory({"k": keys, "v": values}, k_pos, k_valid)
        return y, memory

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        payload = 2 * n_cached * cfg.d_model * 4           # K and V, fp32
        return payload + (n_cached * (4 + 1) if metadata else 0)  # int32 position + bool valid

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, pair = token_macs(cfg), pair_macs(cfg)
        keys = n_cached + q  # dense: every candidate row is computed against every key
        return macs_dict(layer_macs(tok, pair, q, q * keys),
                         layer_macs(tok, pair, n_cached, n_cached * n_cached))
