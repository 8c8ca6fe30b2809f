"""RWKV (v4 time-mix): a recurrent state instead of a KV cache (docs/methods/rwkv.md).

Per layer and user the memory is four vectors, whatever the history length:

    att_xx (d)   the last token's input, for the token shift
    aa, bb (D)   numerator and denominator of the WKV average, scaled by exp(-pp)
    pp (D)       the running maximum exponent that keeps aa, bb finite

A token x (after the block's LayerNorm), with x' the previous token's input:

    k = W_k(μ_k⊙x + (1−μ_k)⊙x'),  v = W_v(μ_v⊙x + (1−μ_v)⊙x'),
    r = σ(W_r(μ_r⊙x + (1−μ_r)⊙x'))
    wkv_t = (Σ_{i<t} e^{(t−1−i)w + k_i} v_i + e^{u+k_t} v_t)
          / (Σ_{i<t} e^{(t−1−i)w + k_i} + e^{u+k_t})
    y = r ⊙ wkv        (the block's f2 then plays RWKV's output projection W_o)

with per-channel decay w = −exp(time_decay) and bonus u = time_first, as RWKV-v4
(BlinkDL/RWKV-LM, `RWKV-v4neo/src/model_run.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from malloc_ray.methods.base import LayerMemory, Method, TestSetting, register
from malloc_ray.methods.common.glue import macs_dict

NEG = -1e30  # "exp of this is 0": the empty state's pp, and masked exponents (finite: no NaN)


@register
class RWKV(Method):
    """RWKV-v4 time-mix as the HSTU layer's token mixer.

    Like-for-like choice: an HSTU layer is `x + f2(mixer(LN(x)))` with no feed-forward part,
    so the mixer is RWKV's time-mix only, with the block's LayerNorm as RWKV's ln1 and f2 as
    its output projection W_o; the receptance gate σ(r) has the place of HSTU's u-gate. The
    channel-mix (RWKV's FFN) is left out, and with it the fifth state vector `ffn_xx`:
    the state is 4 vectors per layer, not v4's 5 (4·d·4 bytes per layer).

    Other adaptations:
    - Positions are not used (the recurrence order is the sequence order). Padding must be on
      the left (valid tokens a contiguous suffix, as `CTRModel` builds them): padded tokens
      contribute nothing and the state before the first valid token is the empty state, so
      they are skipped; the first valid token's shift input is zero, as for v4's first token.
    - Initialisation follows RWKV-v4's per-channel schedules with the layer depth fraction
      fixed at 1/2 (a mixer does not know its layer index).

    `forward` is a chunked parallel form (exact, exponents shifted by their maximum as the
    running-max trick does); `step` is `model_run.py`'s recurrence. A request steps every
    candidate from the same stored state without committing; appends step and commit.
    """

    name = "rwkv"
    category = "architecture"
    chunk = 16  # forward's chunk: memory B·N·chunk·D, N/chunk steps; not a model hparam
    batched_append = True  # appending k at once = k single appends (contract test)
    # No hyperparameters: the state is 4 vectors at any length. 21 interactions make 41
    # tokens, so forward crosses two chunk boundaries.
    test_settings = (TestSetting(id="v4", hparams={}, lengths=(21, 8, 5, 4, 13, 17)),)

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)
        d = D = cfg.d_model
        self.key = nn.Linear(d, D, bias=False)
        self.value = nn.Linear(d, D, bias=False)
        self.receptance = nn.Linear(d, D, bias=False)
        depth, rest = 0.5, 0.5  # v4's ratio_0_to_1 and ratio_1_to_almost0 at mid depth
        ramp = torch.arange(d) / d
        self.time_mix_k = nn.Parameter(ramp ** rest)
        self.time_mix_v = nn.Parameter(ramp ** rest + 0.3 * depth)
        self.time_mix_r = nn.Parameter(ramp ** (0.5 * rest))
        h = torch.arange(D) / max(D - 1, 1)
        self.time_decay = nn.Parameter(-5 + 8 * h ** (0.7 + 1.3 * depth))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(D)]) * 0.5
        self.time_first = nn.Parameter(torch.full((D,), math.log(0.3)) + zigzag)

    def mix(self, x, x_prev):
        """r (after σ), k, v of tokens x whose previous inputs are x_prev."""
        def lerp(mu):
            return x * mu + x_prev * (1 - mu)
        return (torch.sigmoid(self.receptance(lerp(self.time_mix_r))),
                self.key(lerp(self.time_mix_k)), self.value(lerp(self.time_mix_v)))

    # -- recurrent path (serving) --------------------------------------------------------
    def recur(self, x, state):
        """One token per row from `state` (att_xx, aa, bb, pp), model_run.py's recurrence.
        Shapes broadcast: x (..., d) with the state (..., D). Returns y and the next state."""
        xx, aa, bb, pp = state
        r, k, v = self.mix(x, xx)
        w, u = -torch.exp(self.time_decay), self.time_first
        ww = u + k
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
        ww = pp + w
        p = torch.maximum(ww, k)
        e1, e2 = torch.exp(ww - p), torch.exp(k - p)
        return r * wkv, (x, e1 * aa + e2 * v, e1 * bb + e2, p)

    def empty_state(self, x):
        b, d, D = x.shape[0], self.cfg.d_model, self.cfg.d_model
        zeros = x.new_zeros(b, D)
        return (x.new_zeros(b, d), zeros, zeros, torch.full_like(zeros, NEG))

    def forward_recurrent(self, x, valid):
        """Token by token from the empty state; padded tokens leave the state unchanged.
        The reference for the parallel `forward` (tests); returns (y, state)."""
        state, ys = self.empty_state(x), []
        for t in range(x.shape[1]):
            y, new = self.recur(x[:, t], state)
            keep = valid[:, t, None]
            state = tuple(torch.where(keep, n, o) for n, o in zip(new, state))
            ys.append(torch.where(keep, y, 0.0))
        return torch.stack(ys, 1), state

    # -- parallel path (training, prefill) ------------------------------------------------
    def wkv_parallel(self, k, v, valid):
        """WKV of every token and the final (aa, bb, pp), chunk by chunk.

        Inside a chunk every output is a weighted average over [carried state; earlier tokens
        of the chunk; itself] with exponents pp + t·w, (t−1−j)·w + k_j and u + k_t; they are
        shifted by their maximum before exp (the running-max trick in closed form), so
        nothing overflows however long the sequence.
        """
        b, n, D = k.shape
        w, u = -torch.exp(self.time_decay), self.time_first
        live = valid[..., None].to(k.dtype)
        k = torch.where(valid[..., None], k, NEG)
        v = v * live
        aa, bb = k.new_zeros(b, D), k.new_zeros(b, D)
        pp = torch.full_like(aa, NEG)
        out = []
        for s in range(0, n, self.chunk):
            kc, vc, lc = k[:, s:s + self.chunk], v[:, s:s + self.chunk], live[:, s:s + self.chunk]
            T = kc.shape[1]
            t = torch.arange(T, device=k.device)
            dist = (t[:, None] - 1 - t[None, :]).to(k.dtype)                 # t-1-j
            earlier = (t[None, :] < t[:, None])[None, :, :, None]
            inner = torch.where(earlier, dist[None, :, :, None] * w + kc[:, None], NEG)  # (B,T,T,D)
            bonus = u + kc                                                    # (B,T,D)
            carried = pp[:, None] + t[None, :, None].to(k.dtype) * w          # (B,T,D)
            top = torch.maximum(torch.maximum(inner.amax(2), bonus), carried)
            # masked pairs are zeroed explicitly: in an all-padded row top is itself ~NEG
            e_in = torch.exp(inner - top[:, :, None]) * earlier
            e_bo, e_ca = torch.exp(bonus - top), torch.exp(carried - top)
            num = (e_in * vc[:, None]).sum(2) + e_bo * vc + e_ca * aa[:, None]
            den = (e_in * lc[:, None]).sum(2) + e_bo * lc + e_ca * bb[:, None]
            den = den + (1 - lc)  # padded rows: 0/1 instead of 0/0 (their output is unused)
            out.append(num / den)
            # state after the chunk's last token
            last = (T - 1 - t).to(k.dtype)[None, :, None] * w + kc            # (B,T,D)
            carried = pp + T * w
            top = torch.maximum(last.amax(1), carried)
            e_la, e_ca = torch.exp(last - top[:, None]), torch.exp(carried - top)
            aa = e_ca * aa + (e_la * vc).sum(1)
            bb = e_ca * bb + (e_la * lc).sum(1)
            pp = top
        return torch.cat(out, 1), (aa, bb, pp)

    def run(self, x, valid):
        x = x * valid[..., None].to(x.dtype)  # padded inputs are zero: the first shift input
        x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        r, k, v = self.mix(x, x_prev)
        wkv, (aa, bb, pp) = self.wkv_parallel(k, v, valid)
        return r * wkv, (x[:, -1], aa, bb, pp)

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x, pos, valid):
        return self.run(x, valid)[0]

    def prefill(self, x, pos, valid):
        y, state = self.run(x, valid)
        return y, self.pack(state)

    def step(self, x, pos, memory, append):
        state = self.unpack(memory)
        if not append:  # every candidate one step from the same state; nothing is committed
            y, _ = self.recur(x, tuple(s[:, None] for s in state))
            return y, memory
        ys = []
        for t in range(x.shape[1]):
            y, state = self.recur(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1), self.pack(state)

    @staticmethod
    def pack(state) -> LayerMemory:
        return LayerMemory(payload=dict(zip(("att_xx", "aa", "bb", "pp"), state)))

    @staticmethod
    def unpack(memory: LayerMemory):
        p = memory.payload
        return p["att_xx"], p["aa"], p["bb"], p["pp"]

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        return 4 * cfg.d_model * 4  # att_xx, aa, bb, pp in fp32; no metadata

    @classmethod
    def token_macs(cls, cfg) -> tuple[int, int]:
        """(all, matmul) per token: W_k, W_v, W_r (d -> D, no bias), f2 (D -> d, bias), the
        block LayerNorm, σ on r. Token-shift lerps and the WKV update are elementwise (about
        10·D operations, exp included) and not counted, as gating is not for HSTU."""
        d = D = cfg.d_model
        matmul = 3 * d * D + D * d
        return matmul + d + 2 * d + D, matmul

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, tok_mm = cls.token_macs(cfg)
        return macs_dict((q * tok, q * tok_mm), (n_cached * tok, n_cached * tok_mm))
