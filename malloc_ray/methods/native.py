"""Native: the full KV cache (docs/methods/native.md).

Per layer and user it keeps K and V of every history token, (H, N_c, d_h) each, plus their
positions. A request runs only the new tokens through the layer and attends over
[cached K,V ; own k,v]. Exact: it equals recomputing the whole sequence (w/o Mem).

A request never copies the cache: the pointwise weights have no softmax, so the attention is
computed over the cache and over the own tokens as two sums, added (`attend_cache`,
`attend_own`). The part over the cache is a handful of ops whatever its size (baddbmm with
the bias, SiLU and mask in place): with one candidate, a request's time at small caches is
its number of ops (docs/benchmarks.md). An append writes the new K,V into spare capacity
behind the cache (`append_tokens`, capacity doubling); the memory's tensors are views of the
used part, which is what bytes count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malloc_ray.methods.base import Method, TestSetting, register
from malloc_ray.methods.common.glue import (append_tokens, distance_bias, distance_table,
                                            hstu_layers, layer_macs, macs_dict, pair_macs,
                                            pointwise_sum, self_mask, token_macs, token_memory)
from malloc_ray.model.hstu import (HSTUConfig, merge_heads, pointwise_attention, split_heads,
                                   visibility)


class HSTUAttention(Method):
    """The standard HSTU mixer: u,q,k,v = SiLU(f1(x)); y = u * LN(SiLU(QK^T + rab)/n . V)."""

    def __init__(self, cfg: HSTUConfig, hp=None):
        super().__init__(cfg, hp)
        self.f1, self.rab, self.out_norm = hstu_layers(cfg, 4 * cfg.d_model)  # u, q, k, v

    def project(self, x):
        if self.cfg.silu_qkv:  # one SiLU over f1's whole output: the same numbers, 1 op, not 4
            u, q, k, v = F.silu(self.f1(x)).chunk(4, dim=-1)
        else:
            u, q, k, v = self.f1(x).chunk(4, dim=-1)
            u = F.silu(u)
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
    batched_append = True  # appending k at once = k single appends (contract test)
    # Nothing to compress; ragged lengths so the cache holds left-padded users of all sizes.
    test_settings = (TestSetting(id="ragged", hparams={}, lengths=(23, 9, 5, 17, 23, 12)),)

    # token axis of each tensor of the memory: K, V (B, H, N, d_h); pos, valid (B, N)
    memory_axes = {"k": 2, "v": 2, "pos": 1, "valid": 1}

    def prefill(self, x, pos, valid):
        u, q, k, v = self.project(x)
        y = self.attend(u, q, k, v, pos, pos, valid, self_mask(x.shape[1], 0, x.device))
        # k, v are views into f1's whole output (u, q, k, v), 4x what is kept: store copies.
        # K is stored as (B, H, d_h, N) in memory (and kept as its (B, H, N, d_h) transpose):
        # a request's q K^T then streams contiguous rows of K^T, at memory speed.
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        return y, token_memory({"k": k, "v": v.contiguous()}, pos, valid)

    def attend_cache(self, q, k, v, q_pos, k_pos, k_valid, bias_table):
        """pointwise_sum of the request's queries over the cached keys (not divided by n).

        Every cached key is earlier than every request token (a request's positions start
        at the memory's next position), so the mask is the keys' validity alone. The bias
        goes in as baddbmm's addend and SiLU and the mask work in place: a few ops per layer
        whatever the cache size (a request's fixed cost is its number of ops).
        """
        b, h, nq, dh = q.shape
        h_kv, n = k.shape[1], k.shape[2]
        rows = (h // h_kv) * nq  # H / H_kv query heads of a K,V head: its rows, in order
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).clamp_(0, self.rab.max_distance)
        bias = F.embedding(dist, bias_table).permute(0, 3, 1, 2)  # (B, H, Nq, N)
        scores = torch.baddbmm(bias.reshape(b * h_kv, rows, n), q.reshape(b * h_kv, rows, dh),
                               k.transpose(-1, -2).reshape(b * h_kv, dh, n))
        F.silu(scores, inplace=True)
        scores.view(b, h_kv * rows, n).mul_(k_valid[:, None, :])
        return torch.bmm(scores, v.reshape(b * h_kv, n, v.shape[-1])).view(b, h, nq, -1)

    def attend_own(self, q, k, v, pos, bias_table):
        """pointwise_sum of the request's queries over its own tokens (not divided by n)."""
        b, h, nq, dh = q.shape
        h_kv = k.shape[1]  # < h for GQA: query head h reads K,V head h // (h / h_kv)
        if nq == 1:  # one own token: it sees itself, at distance 0
            rows = q.view(b, h_kv, h // h_kv, dh)
            w = F.silu(torch.matmul(rows, k.transpose(-1, -2)) + bias_table[0].view(h_kv, -1, 1))
            return torch.matmul(w, v).view(b, h, 1, v.shape[-1])
        dist = pos[:, :, None] - pos[:, None, :]  # (B, Nq, Nq); > 0: the key is earlier
        see = (dist > 0) | torch.eye(nq, dtype=torch.bool, device=q.device)
        return pointwise_sum(q, k, v, distance_bias(self.rab, dist, bias_table), see[:, None])

    def step(self, x, pos, memory, append):
        u, q, k, v = self.project(x)
        mem, meta = memory.payload, memory.metadata
        table = distance_table(self.rab, x.device)
        av = self.attend_cache(q, mem["k"], mem["v"], pos, meta["pos"], meta["valid"], table)
        av += self.attend_own(q, k, v, pos, table)
        y = u * self.out_norm(merge_heads(av.div_(self.cfg.divisor)))
        if append:
            own = {"pos": pos.to(torch.int32), "valid": torch.ones_like(pos, dtype=torch.bool)}
            memory = append_tokens(memory, {"k": k, "v": v}, own, self.memory_axes)
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
