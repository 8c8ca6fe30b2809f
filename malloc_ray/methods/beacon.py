"""Activation Beacon: condense each full window of history into a few beacon K,V (docs/methods/beacon.md).

The history is cut into windows of `window` tokens by absolute position (window c holds
positions [c·W, (c+1)·W)). When a window is full, m = window / ratio beacons condense it; only
the beacons' K,V are kept, the window's raw K,V are dropped. Per layer and user the memory is

    beacon K,V of every full window            (H, C·m, d_h) each, C = N_c // W
    raw K,V of the unfinished last window      (H, T, d_h) each,   T = N_c mod W

plus an int32 position and a bool validity flag per kept token.

Visibility (one rule for training, prefill, requests and appends, so serving equals forward):
- a raw token sees the beacons of windows strictly before its own, and the raw tokens of its
  own window at earlier positions, plus itself. It never sees its own window's beacons: they
  condense that window's later tokens, i.e. labels it is about to predict;
- beacon j of window c sees every beacon of windows < c and every raw token of window c
  ("full-coverage", `beacon_attend_prev=True` in the reference).

Beacon j of window c sits at position c·W + (j+1)·ratio − 1 (the last raw position of its
`ratio`-token segment, the reference's "interleave" placement) for the relative bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import LayerMemory, TestSetting, register
from malloc_ray.methods.common.glue import (check_bool, check_int, layer_macs, macs_dict,
                                            pair_macs, self_mask, token_macs)
from malloc_ray.methods.native import HSTUAttention
from malloc_ray.model.hstu import merge_heads, pointwise_attention, split_heads, visibility


def window_of(pos: torch.Tensor, window: int) -> torch.Tensor:
    return torch.div(pos, window, rounding_mode="floor")


def read_mask(q_pos, b_pos, b_valid, r_pos, r_valid, same, window: int) -> torch.Tensor:
    """What raw queries see in [beacons; raw tokens]: (B, 1, Nq, Nb + Nr) bool.

    Beacons only of strictly earlier windows (never the query's own window: those beacons
    summarise its future labels); raw tokens only of the query's own window, at earlier
    positions or itself (`same`). Earlier windows reach a query through their beacons only.
    """
    q_win = window_of(q_pos, window)[:, :, None]
    see_beacon = b_valid[:, None, :] & (window_of(b_pos, window)[:, None, :] < q_win)
    see_raw = visibility(q_pos, r_pos, r_valid, same)[:, 0] \
        & (window_of(r_pos, window)[:, None, :] == q_win)
    return torch.cat([see_beacon, see_raw], -1)[:, None]


@register
class Beacon(HSTUAttention):
    """Activation Beacon on HSTU's pointwise SiLU attention.

    Adapted from the reference (FlagEmbedding `modeling_beacon.py`), and why:
    - **Per-layer condensation.** In the reference beacon tokens are extra tokens of the input
      sequence with their own residual stream, so beacon K,V at layer l come from the beacon
      hidden states that layers < l produced. Here the method is only a layer's mixer and the
      model carries raw tokens only, so each layer condenses for itself: beacon j's query is
      q_j = SiLU(W_q^b e_j) from a learned per-layer beacon embedding e_j (one per slot, since
      with full coverage slots would otherwise differ only through the bias); it attends (HSTU
      pointwise attention, same bias and divisor) over the window's raw K,V and the earlier
      beacons; the result a = LN(A·V) gives the beacon's K,V = SiLU(W_kv^b a). Own q/k/v
      projections for beacons, as the reference's `beacon_param=[q,k,v]`. No u-gate on beacons
      (their query is input-independent, so a gate would be a constant per channel).
      Information still flows across windows and layers: raw tokens read earlier beacons and
      their outputs feed the next layer's raw K,V, which that layer condenses again.
    - **Fixed ratio**, no per-step random ratio mix; `window` = stride (no overlap).
    - **Windows by absolute position** (token 0 starts window 0), so a user's windows do not
      depend on batch padding and prefill + appends rebuild exactly the training pass.
    - `raw_beacons=True` (needs ratio 1) keeps the raw activations of full windows as the
      "beacons" (the reference's `beacon_size=-1` path). It has Native's parameters and equals
      Native; it exists to test the windowing and the masks.

    Training runs the same code as serving: the raw K,V of all tokens, then condensation of
    every full window in order (beacons of window c need those of windows < c), then one
    attention of all raw queries over [beacons; raw tokens] with `read_mask`.
    """

    name = "beacon"
    category = "token-merge"

    @dataclass(frozen=True)
    class Hparams:
        window: int = 128       # raw tokens per window (= stride); 64 interactions
        ratio: int = 8          # raw tokens per beacon
        raw_beacons: bool = False  # keep raw activations as beacons (reference beacon_size=-1)

        def __post_init__(self):
            check_int("window", self.window, 1)
            check_int("ratio", self.ratio, 1)
            if self.window % self.ratio:
                raise ValueError(f"window={self.window} must be a multiple of ratio={self.ratio}")
            check_bool("raw_beacons", self.raw_beacons)
            if self.raw_beacons and self.ratio != 1:
                raise ValueError("raw_beacons keeps every raw activation, so it needs ratio=1")

        @property
        def beacons(self) -> int:
            return self.window // self.ratio

    batched_append = True  # appending k at once = k single appends (contract test)
    # The default window (128 tokens) is longer than any test sequence (<= 79 tokens), so it
    # would never condense. Windows of 6-8 tokens condense several times per history, into 4,
    # 1 and 2 beacons. Targets sit at positions 2(l - 1) = 40, 14, 8, 6, 24, 32: several right
    # after a window completes (W = 8: 40, 8, 24, 32; W = 6: 6, 24).
    test_settings = (
        TestSetting(id="w8r2", hparams={"window": 8, "ratio": 2}, lengths=(21, 8, 5, 4, 13, 17)),
        TestSetting(id="w8r8", hparams={"window": 8, "ratio": 8}, lengths=(21, 8, 5, 4, 13, 17)),
        TestSetting(id="w6r3", hparams={"window": 6, "ratio": 3}, lengths=(21, 8, 5, 4, 13, 17)),
    )

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)  # f1, rab, out_norm: Native's parameters, same names
        if not self.hp.raw_beacons:
            d = D = cfg.d_model
            self.beacon_emb = nn.Embedding(self.hp.beacons, d)
            self.beacon_q = nn.Linear(d, D, bias=False)
            self.beacon_kv = nn.Linear(D, 2 * D, bias=False)
            self.beacon_norm = nn.LayerNorm(D)

    # -- condensation ---------------------------------------------------------------------
    def condense(self, k, v, pos, valid, beacons):
        """Beacons of every full window among the raw tokens (k, v, pos, valid).

        The valid raw tokens must be a contiguous suffix starting at a window boundary (true
        for a left-padded history and for [unfinished window; appended tokens]). `beacons`
        (k, v, pos, valid) are those of earlier windows, which new beacons attend to.
        Returns the new beacons and, per user, the first window that is not full.
        """
        W, m, ratio = self.hp.window, self.hp.beacons, self.hp.ratio
        b, h, n, dh = k.shape
        if n == 0:
            return beacons, pos.new_zeros(b)
        n_valid = valid.sum(1)
        start = n - n_valid                                   # index of the first valid token
        first = pos.gather(1, start.clamp(max=n - 1)[:, None])[:, 0]
        c0 = window_of(first, W)
        if bool(((first % W != 0) & (n_valid > 0)).any()):
            raise ValueError("beacon: the raw tokens to condense must start at a window boundary")
        full = n_valid // W                                   # full windows per user
        end = torch.where(n_valid > 0, c0 + full, c0)         # first unfinished window
        new = [[], [], [], []]
        bk, bv, bpos, bvalid = beacons
        n_windows = int(full.max())
        if n_windows and not self.hp.raw_beacons:
            qb = F.silu(self.beacon_q(self.beacon_emb.weight))          # (m, D): input-free
            qb = split_heads(qb[None], h).expand(b, -1, -1, -1)
        offsets = torch.arange(W, device=k.device)
        for r in range(n_windows):
            idx = start[:, None] + r * W + offsets[None]                # (B, W)
            inside = idx < n
            idx = idx.clamp(max=n - 1)
            gather = idx[:, None, :, None].expand(-1, h, -1, dh)
            wk, wv = k.gather(2, gather), v.gather(2, gather)
            wpos, wvalid = pos.gather(1, idx), valid.gather(1, idx) & inside
            is_full = (r < full)[:, None]
            if self.hp.raw_beacons:  # the window's raw activations are its beacons
                ck, cv, cpos, cvalid = wk, wv, wpos, wvalid & is_full
            else:
                cpos = (c0 + r)[:, None] * W + (torch.arange(m, device=k.device) + 1) * ratio - 1
                keys, values = torch.cat([bk, wk], 2), torch.cat([bv, wv], 2)
                k_pos, k_valid = torch.cat([bpos, wpos], 1), torch.cat([bvalid, wvalid], 1)
                mask = k_valid[:, None, None, :].expand(-1, -1, m, -1)  # full coverage
                av = pointwise_attention(qb, keys, values, self.rab(cpos, k_pos), mask,
                                         self.cfg.divisor)
                ck, cv = F.silu(self.beacon_kv(self.beacon_norm(merge_heads(av)))).chunk(2, -1)
                ck, cv = split_heads(ck, h), split_heads(cv, h)
                cvalid = is_full.expand(-1, m)
            for acc, t in zip(new, (ck, cv, cpos, cvalid)):
                acc.append(t)
            bk, bv = torch.cat([bk, ck], 2), torch.cat([bv, cv], 2)
            bpos, bvalid = torch.cat([bpos, cpos], 1), torch.cat([bvalid, cvalid], 1)
        return (bk, bv, bpos, bvalid), end

    # -- one pass over new tokens against what is kept ------------------------------------
    def run(self, x, pos, valid, kept, condense: bool):
        """x: new tokens; kept: (beacons, tail) each (k, v, pos, valid), or None.

        The raw span is [tail; new]. With `condense`, full windows in the span are condensed
        first (appends and training); a request does not condense (a candidate never completes
        a window before itself, and must not change the memory).
        """
        u, q, k, v = self.project(x)
        b, h, _, dh = k.shape
        if kept is None:
            empty = k.new_zeros(b, h, 0, dh)
            none_pos, none_valid = pos[:, :0], valid[:, :0]
            kept = ((empty, empty, none_pos, none_valid), (empty, empty, none_pos, none_valid))
        beacons, tail = kept
        rk, rv = torch.cat([tail[0], k], 2), torch.cat([tail[1], v], 2)
        rpos, rvalid = torch.cat([tail[2], pos], 1), torch.cat([tail[3], valid], 1)
        end = None
        if condense:
            beacons, end = self.condense(rk, rv, rpos, rvalid, beacons)
        n_q, n_r = x.shape[1], rk.shape[2]
        same = self_mask(n_q, n_r - n_q, x.device)
        mask = read_mask(pos, beacons[2], beacons[3], rpos, rvalid, same, self.hp.window)
        keys, values = torch.cat([beacons[0], rk], 2), torch.cat([beacons[1], rv], 2)
        k_pos = torch.cat([beacons[2], rpos], 1)
        av = pointwise_attention(q, keys, values, self.rab(pos, k_pos), mask, self.cfg.divisor)
        return u * self.out_norm(merge_heads(av)), beacons, (rk, rv, rpos, rvalid), end

    @staticmethod
    def pack(beacons, raw, end, window: int) -> LayerMemory:
        """Keep the beacons and the raw tokens of the unfinished window (the last columns:
        valid tokens are a suffix), sliced to the longest such tail in the batch."""
        rk, rv, rpos, rvalid = raw
        in_tail = rvalid & (window_of(rpos, window) >= end[:, None])
        t = int(in_tail.sum(1).max()) if rpos.shape[1] else 0
        n = rpos.shape[1]
        return LayerMemory(
            payload={"beacon_k": beacons[0], "beacon_v": beacons[1],
                     "tail_k": rk[:, :, n - t:], "tail_v": rv[:, :, n - t:]},
            metadata={"beacon_pos": beacons[2].to(torch.int32), "beacon_valid": beacons[3],
                      "tail_pos": rpos[:, n - t:].to(torch.int32),
                      "tail_valid": in_tail[:, n - t:]})

    @staticmethod
    def unpack(memory: LayerMemory, dtype):
        p, m = memory.payload, memory.metadata
        return ((p["beacon_k"], p["beacon_v"], m["beacon_pos"].to(dtype), m["beacon_valid"]),
                (p["tail_k"], p["tail_v"], m["tail_pos"].to(dtype), m["tail_valid"]))

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x, pos, valid):
        return self.run(x, pos, valid, None, condense=True)[0]

    def prefill(self, x, pos, valid):
        y, beacons, raw, end = self.run(x, pos, valid, None, condense=True)
        return y, self.pack(beacons, raw, end, self.hp.window)

    def step(self, x, pos, memory, append):
        kept = self.unpack(memory, pos.dtype)
        valid = torch.ones_like(pos, dtype=torch.bool)
        y, beacons, raw, end = self.run(x, pos, valid, kept, condense=append)
        if append:
            memory = self.pack(beacons, raw, end, self.hp.window)
        return y, memory

    @classmethod
    def kept_tokens(cls, hp, n_cached: int) -> int:
        return (n_cached // hp.window) * hp.beacons + n_cached % hp.window

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        kept = cls.kept_tokens(hp, n_cached)
        return kept * 2 * cfg.d_model * 4 + (kept * (4 + 1) if metadata else 0)

    @classmethod
    def condense_macs(cls, cfg, hp, n_windows: int, earlier: int = 0) -> tuple[int, int]:
        """(all, matmul) MACs to condense n_windows windows after `earlier` beacons.

        Beacon queries (m·d·D + SiLU, once per pass), per window m·(beacons so far + W) pairs,
        the beacon LayerNorm and W_kv^b (D -> 2D) with SiLU. Zero for raw beacons.
        """
        if hp.raw_beacons or n_windows == 0:
            return 0, 0
        d = D = cfg.d_model
        m, W = hp.beacons, hp.window
        pair, pair_mm = pair_macs(cfg)
        pairs = m * (n_windows * (earlier + W) + m * n_windows * (n_windows - 1) // 2)
        matmul = m * d * D + pairs * pair_mm + n_windows * m * D * 2 * D
        return (matmul + m * D + pairs * (pair - pair_mm) + n_windows * m * (2 * D + 2 * D),
                matmul)

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, pair = token_macs(cfg), pair_macs(cfg)
        keys = cls.kept_tokens(hp, n_cached) + q  # dense over [beacons; tail; candidates]
        n_windows = n_cached // hp.window
        beacons = n_windows * hp.beacons
        # prefill as computed: every history row against [all beacons; all raw tokens]
        prefill_keys = beacons + n_cached
        condense = cls.condense_macs(cfg, hp, n_windows)
        return macs_dict(layer_macs(tok, pair, q, q * keys),
                         layer_macs(tok, pair, n_cached, n_cached * prefill_keys, condense),
                         prefill_matmul=True)
