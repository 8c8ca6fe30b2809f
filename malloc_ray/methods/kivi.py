"""KIVI: a 2-bit asymmetric KV cache, keys per channel, values per token (docs/methods/kivi.md).

Post-hoc on Native's weights: the layer computes exactly what Native computes; only what is
kept changes. Per layer and user the memory holds, in token order:

* the oldest tokens, quantized (asymmetric min-max, `common/quant.py`): keys per channel over
  groups of `group_size` consecutive tokens (keys have outlier channels, so each channel gets
  its own range), values per token over groups of `group_size` channels. The codes are packed into
  uint8 (payload); scales and zero points are fp32 metadata;
* the newest tokens in fp32 (metadata): the last `residual_length` tokens plus the trailing
  tokens that do not yet fill a whole group of `group_size` tokens beyond them. When appended
  tokens push the fp32 part past residual_length + group_size, its oldest whole groups are
  quantized and move to the quantized part, as in the KIVI code.

Prefill and append attend over exact K,V (quantization happens when the memory is stored); a
request attends over [dequantized memory; own k,v]. `forward` replays exactly that: the
history rows are the prefill rows (exact) and the last row (the target) is a step over the
memory prefill would keep, so step-after-prefill equals forward at the target.

Adapted from the KIVI code (jy-yuan/KIVI): keys and values share one split point so that K and
V of a token are always in the same part (KIVI keeps T mod R keys but R values in fp32); with
residual_length = 0 the values of the trailing partial key group therefore stay fp32 too.
`bits = 16` keeps fp32 (our baseline is fp32), which makes KIVI equal Native. Details, bytes
and MACs: docs/methods/kivi.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc_ray.methods.common import quant
from malloc_ray.methods.base import LayerMemory, TestSetting, register
from malloc_ray.methods.common.glue import check_int, join_cached, self_mask
from malloc_ray.methods.native import Native
from malloc_ray.model.hstu import merge_heads, split_heads


def right_align(mask: torch.Tensor, *tensors: torch.Tensor):
    """The masked tokens of each row, in order, left-padded to the longest row.

    mask (B, M); tensors (B, M, ...) -> ([(B, S, ...)], valid (B, S)), S = max row count.
    Padding slots are zero. With one user there is no padding, so bytes are exact.
    """
    b, m = mask.shape
    size = int(mask.sum(1).max()) if b * m else 0
    # A stable sort puts the masked tokens last, in their order: keep the last `size` slots.
    idx = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, m - size:]
    kept = mask.gather(1, idx)
    out = []
    for t in tensors:
        shape = (b, size) + (1,) * (t.dim() - 2)
        g = t.gather(1, idx.view(shape).expand((b, size) + t.shape[2:]))
        out.append(torch.where(kept.view(shape), g, torch.zeros_like(g)))
    return out, kept


@register
class KIVI(Native):
    name = "kivi"
    category = "precision"
    workflow = "post-hoc"
    lossless = False  # Native's subclass, but 2-bit K,V change the scores
    # Defaults (groups and residual of 32) quantize nothing below 64 cached tokens. Groups of
    # 4 tokens quantize most of a test history: without a residual window (the trailing
    # partial key group stays fp32, values too), with one, and 4-bit codes over groups of 3
    # (a short last value group, as d = 32 is not a multiple of 3). Lengths: left padding, a
    # user with no history (1) and one shorter than a group (3).
    test_settings = (
        TestSetting(id="g4r0", hparams={"group_size": 4, "residual_length": 0},
                    lengths=(21, 8, 14, 1, 21, 3)),
        TestSetting(id="g4r4", hparams={"group_size": 4, "residual_length": 4},
                    lengths=(21, 8, 14, 1, 21, 3)),
        TestSetting(id="b4g3r5", hparams={"bits": 4, "group_size": 3, "residual_length": 5},
                    lengths=(21, 8, 14, 1, 21, 3)),
    )

    @dataclass(frozen=True)
    class Hparams:
        bits: int = 2              # 2, 4, 8, or 16 = keep fp32
        group_size: int = 32       # tokens per key group, channels per value group
        residual_length: int = 32  # newest tokens always kept fp32

        def __post_init__(self):
            quant.check_bits(self.bits)
            check_int("group_size", self.group_size, 1)
            check_int("residual_length", self.residual_length, 0)

    # Keys are grouped along tokens (per channel); IntactKV groups them along channels.
    key_groups_along_tokens: ClassVar[bool] = True

    @classmethod
    def layout(cls, hp) -> tuple[int, int, int]:
        """(pivots, residual, token_group): the first `pivots` and the last `residual` tokens
        of a user stay fp32; the others are quantized in whole groups of `token_group`."""
        return 0, hp.residual_length, hp.group_size

    @classmethod
    def n_quantized(cls, hp, n) -> torch.Tensor | int:
        """How many of a user's n cached tokens are quantized (n: int or (B,) tensor)."""
        pivots, residual, token_group = cls.layout(hp)
        if isinstance(n, torch.Tensor):
            free = (n - n.clamp(max=pivots) - residual).clamp(min=0)
        else:
            free = max(0, n - min(pivots, n) - residual)
        return token_group * (free // token_group)

    def codecs(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(axis, group) of the key and value quantizers on (B, tokens, channels) tensors."""
        g = self.hp.group_size
        return ((1, g) if self.key_groups_along_tokens else (-1, g)), (-1, g)

    # -- the memory ---------------------------------------------------------------------
    def store(self, k, v, pos, valid, old: LayerMemory | None = None) -> LayerMemory:
        """Add tokens k, v (B, M, D) to `old` (None: empty) and quantize what the layout says.

        Tokens already quantized stay as they are; the fp32 part plus the new tokens are split
        into pivots (a user's first tokens), tokens to quantize now, and the fp32 remainder.
        """
        bits = self.hp.bits
        n_old = 0 if old is None else old.payload["k_codes"].shape[1]
        if old is None:
            quantized_before = torch.zeros(k.shape[0], dtype=torch.long, device=k.device)
        else:
            m = old.metadata
            k, v = torch.cat([m["k_fp32"], k], 1), torch.cat([m["v_fp32"], v], 1)
            pos = torch.cat([m["pos"][:, n_old:].to(pos.dtype), pos], 1)
            valid = torch.cat([m["valid"][:, n_old:], valid], 1)
            quantized_before = m["valid"][:, :n_old].sum(1)
        count = valid.sum(1)
        pivots = (quantized_before + count).clamp(max=self.layout(self.hp)[0])
        # Quantized tokens are always those right after the pivots: pivots are a user's first
        # tokens and stay fp32 for good; the fp32 list is in token order.
        n_new = self.n_quantized(self.hp, count)
        rank = valid.cumsum(1) - 1
        now = valid & (rank >= pivots[:, None]) & (rank < (pivots + n_new)[:, None])
        (qk, qv, qpos), qvalid = right_align(now, k, v, pos)
        (fk, fv, fpos), fvalid = right_align(valid & ~now, k, v, pos)

        (k_axis, k_group), (v_axis, v_group) = self.codecs()
        enc = {f"k_{n}": t for n, t in quant.encode(qk, bits, k_group, k_axis).items()}
        enc |= {f"v_{n}": t for n, t in quant.encode(qv, bits, v_group, v_axis).items()}
        if old is not None:  # newer quantized tokens go after the older ones (per user in order)
            prev = {**old.payload, **old.metadata}
            enc = {n: torch.cat([prev[n], t], 1) for n, t in enc.items()}
            qpos = torch.cat([old.metadata["pos"][:, :n_old].to(qpos.dtype), qpos], 1)
            qvalid = torch.cat([old.metadata["valid"][:, :n_old], qvalid], 1)
        payload = {"k_codes": enc.pop("k_codes"), "v_codes": enc.pop("v_codes")}
        metadata = {**enc, "k_fp32": fk, "v_fp32": fv,
                    "pos": torch.cat([qpos, fpos], 1).to(torch.int32),  # quantized part first
                    "valid": torch.cat([qvalid, fvalid], 1)}
        return LayerMemory(payload=payload, metadata=metadata)

    def read(self, memory: LayerMemory):
        """-> K, V (B, H, M, d_h) dequantized (quantized part first, then fp32), pos, valid."""
        bits, d = self.hp.bits, self.cfg.d_model
        parts = {**memory.payload, **memory.metadata}
        (k_axis, k_group), (v_axis, v_group) = self.codecs()
        fields = ("codes", "scale", "zero")
        k = quant.decode({f: parts[f"k_{f}"] for f in fields if f"k_{f}" in parts},
                         bits, k_group, k_axis, d)
        v = quant.decode({f: parts[f"v_{f}"] for f in fields if f"v_{f}" in parts},
                         bits, v_group, v_axis, d)
        k = torch.cat([k, memory.metadata["k_fp32"]], 1)
        v = torch.cat([v, memory.metadata["v_fp32"]], 1)
        h, m = self.cfg.num_heads, memory.metadata
        return split_heads(k, h), split_heads(v, h), m["pos"], m["valid"]

    # -- the contract -------------------------------------------------------------------
    def forward(self, x, pos, valid):
        # Serving, replayed: the history rows are prefill's (exact), the last row (the target)
        # is a step over the memory prefill keeps. Same code path, so step == forward there.
        y_hist, memory = self.prefill(x[:, :-1], pos[:, :-1], valid[:, :-1])
        y_last, _ = self.step(x[:, -1:], pos[:, -1:], memory, append=False)
        return torch.cat([y_hist, y_last], 1)

    def prefill(self, x, pos, valid):
        u, q, k, v = self.project(x)
        same = self_mask(x.shape[1], 0, x.device)
        y = self.attend(u, q, k, v, pos, pos, valid, same)  # exact: quantize on storing
        return y, self.store(merge_heads(k), merge_heads(v), pos, valid)

    def step(self, x, pos, memory, append):
        u, q, k, v = self.project(x)
        mem_k, mem_v, mem_pos, mem_valid = self.read(memory)
        keys, values = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
        k_pos, k_valid, same = join_cached(mem_pos, mem_valid, pos)
        y = self.attend(u, q, keys, values, pos, k_pos, k_valid, same)
        if append:
            new_valid = torch.ones_like(pos, dtype=torch.bool)
            memory = self.store(merge_heads(k), merge_heads(v), pos, new_valid, old=memory)
        return y, memory

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        d, bits, g = cfg.d_model, hp.bits, hp.group_size
        n_q = cls.n_quantized(hp, n_cached)
        width = 4 * d if bits == quant.FULL else quant.packed_width(d, bits)
        payload = 2 * n_q * width  # packed K and V codes
        if not metadata:
            return payload
        groups = 0  # fp32 scale + zero point per group
        if bits != quant.FULL:
            key_groups = (n_q // g) * d if cls.key_groups_along_tokens else n_q * -(-d // g)
            groups = key_groups + n_q * -(-d // g)
        n_fp32 = n_cached - n_q
        # + scales and zero points, fp32 K and V, an int32 position and a bool flag per token
        return payload + 2 * 4 * groups + 2 * n_fp32 * d * 4 + n_cached * (4 + 1)

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        """Native's, plus one multiply-add per quantized K/V element: to dequantize it on each
        request, and to quantize it ((x - zero) / scale) at prefill. Not matmuls."""
        out = dict(super().macs(cfg, hp, n_cached, q))
        n_q = 0 if hp.bits == quant.FULL else cls.n_quantized(hp, n_cached)
        out["request"] += 2 * n_q * cfg.d_model
        out["prefill"] += 2 * n_q * cfg.d_model
        return out
