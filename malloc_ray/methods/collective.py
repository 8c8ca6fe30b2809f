"""CollectiveKV: a user-specific sliver of K,V per user, the rest from a shared pool
(docs/methods/collectivekv.md; arXiv 2601.19178).

K and V of a token are the concatenation of two parts (V works the same way as K):

    K = [ SiLU(W_k x)             (usr_dim channels, user-specific: stored per user)
          w · pool_K[i]         ] (D − usr_dim channels, shared: a learned pool row)
    i = argmax router_K(x),  w = softmax(router_K(x))[i]      (top-1 routing)

Per layer and user the memory is, per history token, the user-specific parts of K and V
(usr_dim fp32 each) and, for K and for V, the pool index i (the smallest integer dtype that
holds the pool size) and the weight w (fp16); plus an int32 position and a bool validity flag
as metadata. The pools are model parameters, kept once for all users (`shared_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import Method, TestSetting, register
from malloc_ray.methods.common.glue import (check_int, join_cached, layer_macs, macs_dict,
                                            pair_macs, self_mask, token_memory)
from malloc_ray.methods.native import HSTUAttention
from malloc_ray.model.hstu import RelativeBias, split_heads

WEIGHT_DTYPE = torch.float16  # the stored routing weight (see `CollectiveKV.route`)


def index_dtype(pool_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every index 0 .. pool_size - 1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if pool_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"pool_size={pool_size} does not fit an int32 index")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@register
class CollectiveKV(Method):
    """CollectiveKV on HSTU: per user only a low-dimensional K,V part and pool pointers.

    What the layer is (from the authors' `HSTUBlock_GMUS`, methods.md §4.13): f1 gives u, q
    (d → 2D, SiLU as HSTU) and the user-specific K, V parts (d → usr_dim each, SiLU as HSTU's
    K, V); the remaining D − usr_dim channels of K (and of V) are one row of a learned pool
    (`pool_size` rows) chosen by a router `softmax(router_K(x))`, top-1, scaled by its
    probability. K, V are then split into heads as usual, so the user-specific channels are
    the first channels of the first head(s). Attention, bias, mask, divisor and the
    `u · LN(A·V)` output are Native's.

    Training and serving: the router's top-1 index is not differentiable; the weight (the
    softmax probability of the chosen row) is, and it carries the router's gradient, as in
    the authors' code; the chosen pool row gets the rest. `forward`, `prefill` and a request's
    own tokens all route with the same function (`route`), and a request rebuilds the cached
    K, V from the stored index and weight, so serving computes what training computed.

    Adapted / simplified (docs/methods/collectivekv.md says why):
    - default pool 1024 rows, not the authors' 10,000: each router is a d × P matmul and a
      softmax over P for every token, which at 10,000 rows made a tiny CPU training step 40×
      Native's (tests/test_training.py would take hours); `pool_size=10000` gives the
      authors' pool, with the same per-user bytes (int16 indices either way);
    - usr_dim 1 by default (the authors' default was not readable): 0.78% of Native's
      payload at the paper's scale, the paper's 0.8%;
    - the weight is rounded to fp16 in training too (a straight-through rounding: the forward
      uses the stored value, the gradient passes unchanged), so the stored 2-byte weight is
      exactly what training used;
    - f1 is one Linear d → 2D + 2·usr_dim (u, q, user K, user V): the authors' f1 (u, q) and
      W_k, W_v concatenated row-wise, the same function; with usr_dim = d its weight has
      Native's shape and layout, and the layer is Native's (tested);
    - usr_dim is clipped to d (`usr_width`); with usr_dim ≥ d there is no pool and no router;
    - no auxiliary router loss: the authors' code has an optional load-balance (KL to uniform)
      term in a later variant; the method contract has no way to add a loss, and top-1 with
      the weight's gradient trains without it here;
    - router initialisation (not given by the paper): logits of standard deviation
      sqrt(2·ln P) for a LayerNormed input, so that the top-1 weight starts at order 0.1-1,
      not at 1/P (a near-zero shared part would barely train);
    - pool initialisation N(0, 1/3): the spread of a default-initialised Linear's output.
    """

    name = "collectivekv"
    category = "head"
    batched_append = True  # appending k at once = k single appends (contract test)
    # Small pools keep the tiny model's routers small and exercise both index dtypes (uint8
    # up to 256 rows, int16 above). usr_dim 12 spans one and a half heads of the tiny model
    # (d_h = 8); usr_dim 1 is the default.
    test_settings = (
        TestSetting(id="u4p64", hparams={"usr_dim": 4, "pool_size": 64},
                    lengths=(19, 7, 12, 19, 4, 1)),
        TestSetting(id="u1p300", hparams={"usr_dim": 1, "pool_size": 300},
                    lengths=(21, 8, 5, 13, 17)),
        TestSetting(id="u12p32", hparams={"usr_dim": 12, "pool_size": 32},
                    lengths=(16, 3, 11, 9)),
    )

    @dataclass(frozen=True)
    class Hparams:
        usr_dim: int = 1          # user-specific channels of K (and of V) per token
        pool_size: int = 1024     # rows of each shared pool (authors: 10,000; see the docs)

        def __post_init__(self):
            check_int("usr_dim", self.usr_dim, 1)
            check_int("pool_size", self.pool_size, 1)
            index_dtype(self.pool_size)  # raises if no integer dtype holds it

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)
        d = D = cfg.d_model
        u, g, P = self.usr_width(cfg, self.hp), self.global_width(cfg, self.hp), self.hp.pool_size
        self.f1 = nn.Linear(d, 2 * D + 2 * u, bias=False)  # u, q, user K, user V
        if g:
            self.router_k = nn.Linear(d, P, bias=False)
            self.router_v = nn.Linear(d, P, bias=False)
            std = math.sqrt(2 * math.log(max(P, 2)) / d)   # logit std sqrt(2 ln P), see docstring
            nn.init.normal_(self.router_k.weight, std=std)
            nn.init.normal_(self.router_v.weight, std=std)
            self.pool_k = nn.Parameter(torch.randn(P, g) / math.sqrt(3))
            self.pool_v = nn.Parameter(torch.randn(P, g) / math.sqrt(3))
        self.rab = RelativeBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance)
        self.out_norm = nn.LayerNorm(D)

    @staticmethod
    def usr_width(cfg, hp) -> int:
        return min(hp.usr_dim, cfg.d_model)

    @classmethod
    def global_width(cls, cfg, hp) -> int:
        return cfg.d_model - cls.usr_width(cfg, hp)

    # -- routing and K, V --------------------------------------------------------------------
    def route(self, router: nn.Linear, x):
        """Top-1 pool row per token: (index int64, weight) of shape x.shape[:-1].

        The index is the logits' maximum, the first one on ties (torch.max over a dim, as
        argmax; faster on CPU), so the choice depends on the token's input only. The weight
        is the chosen row's softmax probability, rounded to the stored dtype in the forward
        (straight-through: its gradient is the softmax's).
        """
        logits = router(x)
        index = logits.detach().max(-1).indices
        weight = torch.softmax(logits, -1).gather(-1, index[..., None])[..., 0]
        stored = weight.to(WEIGHT_DTYPE).to(weight.dtype)
        return index, weight + (stored - weight).detach()

    def parts(self, x):
        """u (B,N,D), q (B,H,N,d_h) and what K, V are made of: a dict of the user-specific
        parts (B,N,usr) and, with a pool, per K and V the index and weight (B,N)."""
        D, usr = self.cfg.d_model, self.usr_width(self.cfg, self.hp)
        gate, q, kv = self.f1(x).split([D, D, 2 * usr], -1)
        gate = F.silu(gate)
        if self.cfg.silu_qkv:
            q, kv = F.silu(q), F.silu(kv)
        k_usr, v_usr = kv.chunk(2, -1)
        parts = {"k_usr": k_usr, "v_usr": v_usr}
        if self.global_width(self.cfg, self.hp):
            parts["k_index"], parts["k_weight"] = self.route(self.router_k, x)
            parts["v_index"], parts["v_weight"] = self.route(self.router_v, x)
        return gate, split_heads(q, self.cfg.num_heads), parts

    def assemble(self, parts):
        """K, V (B,H,N,d_h) from their parts: [user part ; weight · pool row]."""
        out = []
        for kind, pool in (("k", "pool_k"), ("v", "pool_v")):
            full = parts[f"{kind}_usr"]
            if self.global_width(self.cfg, self.hp):
                # a lookup with a deterministic backward on CPU (indexing accumulates racily)
                shared = F.embedding(parts[f"{kind}_index"].long(), getattr(self, pool))
                weight = parts[f"{kind}_weight"].to(shared.dtype)[..., None]
                full = torch.cat([full, weight * shared], -1)
            out.append(split_heads(full, self.cfg.num_heads))
        return out

    @staticmethod
    def pack(parts, pool_size: int) -> dict[str, torch.Tensor]:
        """What is stored: user parts as they are, indices and weights in compact dtypes."""
        out = {}
        for key, t in parts.items():
            if key.endswith("_index"):
                t = t.to(index_dtype(pool_size))
            elif key.endswith("_weight"):
                t = t.to(WEIGHT_DTYPE)  # exact: the forward already used this rounding
            out[key] = t
        return out

    # Native's attention and output, gate · LN(A·V), on the assembled K, V (same rab and
    # out_norm names); shared as a function, not by inheritance, since f1 and the init differ.
    attend = HSTUAttention.attend

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x, pos, valid):
        return self.prefill(x, pos, valid)[0]

    def prefill(self, x, pos, valid):
        gate, q, parts = self.parts(x)
        k, v = self.assemble(parts)
        y = self.attend(gate, q, k, v, pos, pos, valid, self_mask(x.shape[1], 0, x.device))
        return y, token_memory(self.pack(parts, self.hp.pool_size), pos, valid)

    def step(self, x, pos, memory, append):
        gate, q, parts = self.parts(x)
        new = self.pack(parts, self.hp.pool_size)
        stored = {key: torch.cat([memory.payload[key], new[key]], 1) for key in new}
        k, v = self.assemble(stored)  # the cache rebuilt from its stored parts, and the new tokens
        k_pos, k_valid, same = join_cached(memory.metadata["pos"], memory.metadata["valid"], pos)
        y = self.attend(gate, q, k, v, pos, k_pos, k_valid, same)
        if append:
            memory = token_memory(stored, k_pos, k_valid)
        return y, memory

    # -- costs ----------------------------------------------------------------------------
    @classmethod
    def token_bytes(cls, cfg, hp) -> int:
        """Payload bytes per cached token and layer: user K, V parts (fp32) and, with a pool,
        an index and an fp16 weight for K and for V."""
        usr = 2 * cls.usr_width(cfg, hp) * 4
        if not cls.global_width(cfg, hp):
            return usr
        return usr + 2 * (dtype_bytes(index_dtype(hp.pool_size)) + dtype_bytes(WEIGHT_DTYPE))

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        payload = n_cached * cls.token_bytes(cfg, hp)
        return payload + (n_cached * (4 + 1) if metadata else 0)  # int32 position + bool valid

    @classmethod
    def shared_bytes(cls, cfg, hp) -> int:
        """The K and V pools of every layer, fp32: kept once per model, whatever the users."""
        return cfg.num_layers * 2 * hp.pool_size * cls.global_width(cfg, hp) * 4

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        """Per token outside attention: f1 d → 2D + 2u, the two routers d → P, f2 with bias
        (matmuls); SiLU on u, q and the user parts, the two softmaxes over P, the weight ·
        pool-row scaling of the token's own K, V (2g), two LayerNorms. A request also rebuilds
        the cached K, V (2g multiplies per cached token, once per request, not a matmul).
        Pairs are Native's: the assembled K, V are D wide."""
        d = D = cfg.d_model
        usr, g, P = cls.usr_width(cfg, hp), cls.global_width(cfg, hp), hp.pool_size
        routers = 2 if g else 0
        tok_mm = d * (2 * D + 2 * usr) + routers * d * P + D * d
        tok = tok_mm + (2 * D + 2 * usr) + routers * P + 2 * g + 2 * d + 2 * D + d
        row, pair, keys = (tok, tok_mm), pair_macs(cfg), n_cached + q
        rebuild = n_cached * 2 * g  # not a matmul
        return macs_dict(layer_macs(row, pair, q, q * keys, (rebuild, 0)),
                         layer_macs(row, pair, n_cached, n_cached * n_cached))
