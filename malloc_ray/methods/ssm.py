"""Selective SSM (Mamba-style), after HoloMambaRec (arXiv 2601.08360): a recurrent state of
fixed size instead of a KV cache (docs/methods/ssm.md).

Per layer and user the memory is, whatever the history length:

    h     (E, N)       the SSM state after the last history token
    conv  (K - 1, E)   the last K - 1 inputs of the short causal convolution

with E = expand · d_model (d_inner), N = d_state, K = d_conv. A token x (after the block's
LayerNorm):

    a, z = in_proj(x)                      d -> 2E, no bias
    u    = SiLU(conv_K(a))                 depthwise causal conv over the last K inputs a
    δ, B, C = x_proj(u)                    E -> R + 2N (R = dt_rank), no bias
    Δ    = softplus(dt_proj(δ))            R -> E, with bias: a step size per channel and token
    h_t  = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t ⊙ u_t) ⊗ B_t    A = −exp(A_log) (E, N), diagonal
    y_t  = h_t C_t + D ⊙ u_t
    out  = out_proj(y ⊙ SiLU(z))           E -> d; absent when E = d (the block's f2 is it)

Δ, B and C depend on the token (the "selection"); A is a per-(channel, state) decay. Padded
tokens (on the left) have a = u = 0, so they leave the state and the conv window empty.

Also here: holographic item-attribute binding (HoloMambaRec's embedding layer), the binding
op and a module ready to wire, which the model does not call (see `HolographicBinding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import LayerMemory, Method, TestSetting, register
from malloc_ray.methods.common.glue import check_int, macs_dict


# -- scans: h_t = dA_t ⊙ h_{t-1} + dBu_t from h_0 = 0, over dim 1 ----------------------------
def scan_reference(dA: torch.Tensor, dBu: torch.Tensor) -> torch.Tensor:
    """Token by token, the recurrence as written. dA, dBu (B, T, E, N) -> every h_t."""
    h, hs = dBu.new_zeros(dBu.shape[:1] + dBu.shape[2:]), []
    for t in range(dA.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        hs.append(h)
    return torch.stack(hs, 1) if hs else torch.zeros_like(dBu)


class _Scan(torch.autograd.Function):
    """`scan_reference`'s recurrence with a hand-written backward.

    Autograd through the token loop records a few small ops per token and replays them one
    by one; here the backward is one reverse recurrence of the same shape: with G_t the
    total gradient reaching h_t, G_t = ∂L/∂h_t + dA_{t+1} ⊙ G_{t+1}, then
    ∂L/∂dBu_t = G_t and ∂L/∂dA_t = G_t ⊙ h_{t-1}. Saved: dA and the states (what autograd
    would save too). About 6-10x faster than autograd for a tiny training step on CPU.
    """

    @staticmethod
    def forward(ctx, dA, dBu):
        h, hs = dBu.new_zeros(dBu.shape[:1] + dBu.shape[2:]), []
        for t in range(dA.shape[1]):
            h = torch.addcmul(dBu[:, t], dA[:, t], h)
            hs.append(h)
        hs = torch.stack(hs, 1) if hs else torch.zeros_like(dBu)
        ctx.save_for_backward(dA, hs)
        return hs

    @staticmethod
    def backward(ctx, grad):
        dA, hs = ctx.saved_tensors
        T = dA.shape[1]
        if not T:
            return torch.zeros_like(dA), torch.zeros_like(grad)
        g, gs = grad[:, -1], [None] * T
        gs[-1] = g
        for t in reversed(range(T - 1)):
            g = torch.addcmul(grad[:, t], dA[:, t + 1], g)
            gs[t] = g
        G = torch.stack(gs, 1)
        before = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], 1)  # h_{t-1}, h_{-1} = 0
        return G * before, G


def scan(dA: torch.Tensor, dBu: torch.Tensor) -> torch.Tensor:
    """The states of `scan_reference`, with the fast backward (training, prefill)."""
    return _Scan.apply(dA, dBu)


# -- holographic binding (HoloMambaRec's embedding layer; not wired, see the class) --------
def circular_convolution_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x ⊛ y)_j = Σ_k x_k y_{(j−k) mod d}, written out (O(d²)); over the last dim."""
    d = x.shape[-1]
    j, k = torch.arange(d)[:, None], torch.arange(d)[None, :]
    return (x[..., None, :] * y[..., (j - k) % d]).sum(-1)


def circular_convolution(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x ⊛ y through the FFT (convolution theorem), O(d log d): keeps the width d, unlike a
    concatenation or an outer product."""
    d = x.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(x, dim=-1) * torch.fft.rfft(y, dim=-1), n=d, dim=-1)


class HolographicBinding(nn.Module):
    """ẽ = LayerNorm(e + α · (e ⊛ c)): an item embedding e bound to its category's embedding c
    by circular convolution, α a learned scalar (HoloMambaRec's item-attribute binding).

    Categories come from a deterministic map, category = (item − 1) mod `categories`, as the
    synthetic generator defines them (malloc_ray/data/sources/synthetic.py, `item_category`);
    padding (item 0) stays the zero vector.

    NOT WIRED: a mixer sees the layer's hidden states, never item ids, and CTRModel
    (malloc_ray/model/ctr.py) embeds items itself, so binding needs one call there
    (`item = binding(items, self.item_emb(items))` in `interleave`) and the category count in
    the model's config. None of our datasets passes category ids to the model today.
    """

    def __init__(self, d_model: int, categories: int, alpha: float = 1.0):
        super().__init__()
        check_int("categories", categories, 1)
        self.categories = categories
        self.category_emb = nn.Embedding(categories, d_model)
        nn.init.normal_(self.category_emb.weight, std=1 / math.sqrt(d_model))  # unit norm
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.norm = nn.LayerNorm(d_model)

    def category(self, items: torch.Tensor) -> torch.Tensor:
        return torch.remainder(items - 1, self.categories)

    def forward(self, items: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        c = self.category_emb(self.category(items))
        bound = self.norm(item_emb + self.alpha * circular_convolution(item_emb, c))
        return torch.where((items == 0)[..., None], 0.0, bound)


# -- the method ------------------------------------------------------------------------------
@register
class SelectiveSSM(Method):
    """Mamba-1's selective SSM as the HSTU layer's token mixer, after HoloMambaRec.

    Like-for-like choice (as for RWKV): an HSTU layer is `x + f2(mixer(LN(x)))`, so the mixer
    is one Mamba block's inner part, with the block's LayerNorm as Mamba's pre-norm and the
    block's f2 after `out_proj` (no `out_proj` when E = d: f2 plays it). Positions are not used
    (the recurrence order is the sequence order); the relative bias is unused.

    Serving: a request steps every candidate from the same stored state (its conv window is
    the stored K − 1 inputs and its own), nothing committed, so candidates see the history
    and themselves only; an append steps the new tokens in order and commits. Training and
    prefill compute every token's Δ, B, C at once (parallel over tokens) and run the linear
    recurrence with `scan`, a sequential loop with a hand-written backward (equal to the
    plain autograd loop `scan_reference` and to stepping the serving path: tested).

    Adapted / simplified relative to the paper (docs/methods/ssm.md):
    - the label token y_t is an input like an item (the interleaved layout), and HSTU's block
      (pre-LN, residual, f2) wraps the SSM; no separate feed-forward;
    - the holographic item-attribute binding is implemented (`HolographicBinding`) but not
      wired: the model path carries no category ids;
    - temporal bundling and inference-time compression (the paper's "forward-compatible"
      mechanisms) are left out;
    - the paper's block shape and initialisation are not available to us: Mamba-1's are used,
      except the defaults expand 1 and d_conv 2 (Mamba: 2 and 4), our choice (docs say why);
    - the scan is a plain PyTorch loop over tokens (no fused parallel-scan kernel, as Mamba's
      CUDA one): training materialises (B, T, E, N) tensors and runs T small steps each way.
    - Padding must be on the left (valid tokens a contiguous suffix, as CTRModel builds them).
    """

    name = "ssm"
    category = "architecture"
    dt_init = (1e-3, 1e-1)  # Δ at initialisation spreads log-uniformly over this range

    @dataclass(frozen=True)
    class Hparams:
        d_state: int = 16  # N: state size per channel (Mamba's default)
        expand: int = 1    # E = expand · d_model channels (Mamba: 2; 1 = f2 is out_proj)
        d_conv: int = 2    # K: causal conv taps, 2 = one (item, label) pair (Mamba: 4); 1 = none
        dt_rank: int = 0   # R: rank of Δ's projection; 0 = ceil(d_model / 16), Mamba's "auto"

        def __post_init__(self):
            check_int("d_state", self.d_state, 1)
            check_int("expand", self.expand, 1)
            check_int("d_conv", self.d_conv, 1)
            check_int("dt_rank", self.dt_rank, 0)

    batched_append = True  # appending k at once = k single appends (contract test)
    # The state is a constant size, so every length compresses once Native's cache outgrows
    # it: the defaults keep 2176 B per layer on the tiny model, Native 10440 B at 20
    # interactions. A length-1 window leaves an empty history (all padding). The second
    # setting is Mamba's block shape (expand 2, so out_proj; a 4-tap conv) at the tiny
    # model's max_len (79 tokens).
    test_settings = (
        TestSetting(id="default", hparams={}, lengths=(21, 8, 5, 1, 13, 17)),
        TestSetting(id="e2k4n8", hparams={"d_state": 8, "expand": 2, "d_conv": 4},
                    lengths=(40, 9, 3, 26, 1, 14)),
    )

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)
        d, E, N, K, R = self.dims(cfg, self.hp)
        self.in_proj = nn.Linear(d, 2 * E, bias=False)
        bound = 1 / math.sqrt(K)  # nn.Conv1d's default for a depthwise conv (fan-in K)
        self.conv_weight = nn.Parameter(torch.empty(E, K).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(E).uniform_(-bound, bound))
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.out_proj = nn.Linear(E, d, bias=False) if E != d else None
        # Mamba's initialisation: S4D-real decays A = −(1..N) per channel, skip D = 1, and
        # step sizes Δ = softplus(bias) spread log-uniformly over `dt_init`.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32))
                                  .repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-R ** -0.5, R ** -0.5)
            lo, hi = (math.log(v) for v in self.dt_init)
            dt = torch.exp(torch.rand(E) * (hi - lo) + lo)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    @staticmethod
    def dims(cfg, hp) -> tuple[int, int, int, int, int]:
        """(d, E, N, K, R)."""
        d = cfg.d_model
        return d, hp.expand * d, hp.d_state, hp.d_conv, hp.dt_rank or math.ceil(d / 16)

    # -- pieces shared by the full-sequence and the recurrent path ---------------------------
    def conv(self, windows: torch.Tensor) -> torch.Tensor:
        """SiLU of the depthwise causal conv; windows (..., E, K), oldest input first.
        Elementwise (not F.conv1d) so that forward and step add the same terms in order."""
        return F.silu((windows * self.conv_weight).sum(-1) + self.conv_bias)

    def select(self, u: torch.Tensor):
        """Δ (..., E), B and C (..., N) of tokens u, and the discretised decay and input:
        dA = exp(Δ ⊗ A), dBu = (Δ ⊙ u) ⊗ B, (..., E, N)."""
        _, _, N, _, R = self.dims(self.cfg, self.hp)
        low, B, C = self.x_proj(u).split([R, N, N], dim=-1)
        delta = F.softplus(self.dt_proj(low))
        A = -torch.exp(self.A_log)
        dA = torch.exp(delta[..., None] * A)
        dBu = (delta * u)[..., None] * B[..., None, :]
        return dA, dBu, C

    def output(self, h, C, u, z) -> torch.Tensor:
        y = (h * C[..., None, :]).sum(-1) + self.D * u
        y = y * F.silu(z)
        return self.out_proj(y) if self.out_proj is not None else y

    # -- full-sequence path (training, prefill) ----------------------------------------------
    def run(self, x, valid, reference: bool = False):
        """Outputs of every token and the final (h, conv) state; x (B, T, d), left-padded.
        `reference` runs `scan_reference` (plain autograd) instead of `scan` (tests)."""
        _, E, _, K, _ = self.dims(self.cfg, self.hp)
        live = valid[..., None].to(x.dtype)
        a, z = self.in_proj(x).chunk(2, dim=-1)
        a = a * live  # padded tokens feed zeros to the conv, as the empty window holds
        padded = torch.cat([a.new_zeros(a.shape[0], K - 1, E), a], 1)
        u = self.conv(padded.unfold(1, K, 1)) * live  # (B, T, E): padded tokens add nothing
        dA, dBu, C = self.select(u)
        h = scan_reference(dA, dBu) if reference else scan(dA, dBu)
        last = h[:, -1] if h.shape[1] else dBu.new_zeros(x.shape[0], E, self.hp.d_state)
        return self.output(h, C, u, z), (last, padded[:, padded.shape[1] - (K - 1):])

    # -- recurrent path (serving) -------------------------------------------------------------
    def recur(self, x, state):
        """Tokens x (B, q, d), each one step from the same state (h (B, E, N), conv
        (B, K-1, E)). Returns y (B, q, d) and, per token, its h (B, q, E, N) and input a."""
        h, window = state
        a, z = self.in_proj(x).chunk(2, dim=-1)
        b, q = x.shape[:2]
        windows = torch.cat([window[:, None].expand(b, q, *window.shape[1:]), a[:, :, None]], 2)
        u = self.conv(windows.transpose(-1, -2))
        dA, dBu, C = self.select(u)
        h = dA * h[:, None] + dBu
        return self.output(h, C, u, z), h, a

    def forward_recurrent(self, x, valid):
        """Token by token from the empty state, padded tokens skipped: the reference for
        `run` (tests). Returns (y, state)."""
        _, E, N, K, _ = self.dims(self.cfg, self.hp)
        state = (x.new_zeros(x.shape[0], E, N), x.new_zeros(x.shape[0], K - 1, E))
        ys = []
        for t in range(x.shape[1]):
            y, h, a = self.recur(x[:, t:t + 1], state)
            keep = valid[:, t]
            state = (torch.where(keep[:, None, None], h[:, 0], state[0]),
                     torch.where(keep[:, None, None], self.shift(state[1], a), state[1]))
            ys.append(y[:, 0])
        return torch.stack(ys, 1), state

    @staticmethod
    def shift(window, a):
        """The conv window after input a (B, 1, E): drop the oldest, append a."""
        return torch.cat([window, a], 1)[:, 1:]

    # -- the contract -------------------------------------------------------------------------
    def forward(self, x, pos, valid):
        return self.run(x, valid)[0]

    def prefill(self, x, pos, valid):
        y, (h, window) = self.run(x, valid)
        return y, LayerMemory(payload={"h": h, "conv": window})

    def step(self, x, pos, memory, append):
        state = (memory.payload["h"], memory.payload["conv"])
        if not append:  # every candidate from the same state; nothing is committed
            return self.recur(x, state)[0], memory
        ys = []
        for t in range(x.shape[1]):
            y, h, a = self.recur(x[:, t:t + 1], state)
            state = (h[:, 0], self.shift(state[1], a))
            ys.append(y)
        return torch.cat(ys, 1), LayerMemory(payload={"h": state[0], "conv": state[1]})

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        _, E, N, K, _ = cls.dims(cfg, hp)
        return (E * N + (K - 1) * E) * 4  # h and the conv window, fp32; no metadata

    @classmethod
    def token_macs(cls, cfg, hp) -> tuple[int, int]:
        """(all, matmul-only) MACs per token per layer.

        Matmuls: in_proj d·2E, x_proj E·(R+2N), dt_proj R·E, out_proj E·d (when E ≠ d),
        f2 d·d. Also counted: the block LayerNorm (2d), the conv (K·E taps + E bias), SiLU on
        u and z (2E), dt_proj's bias and softplus (2E), the skip D⊙u (E), f2's bias (d), and
        the scan, 5·E·N: Δ⊗A, its exp, (Δu)⊗B, the state update, the read C·h. The output
        gating (y ⊙ SiLU(z)) is elementwise and not counted, as HSTU's u-gating is not.
        """
        d, E, N, K, R = cls.dims(cfg, hp)
        matmul = d * 2 * E + E * (R + 2 * N) + R * E + (E * d if E != d else 0) + d * d
        return matmul + 2 * d + (K + 1) * E + 2 * E + 2 * E + E + d + 5 * E * N, matmul

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, tok_mm = cls.token_macs(cfg, hp)
        # independent of n_cached: the state is all a request reads; prefill is linear.
        return macs_dict((q * tok, q * tok_mm), (n_cached * tok, n_cached * tok_mm))
