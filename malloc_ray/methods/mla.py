"""MLA: multi-head latent attention, a low-rank latent KV cache (docs/methods/mla.md).

Per layer and user it keeps one latent vector c = W_DKV·x of r floats per history token (plus
positions) instead of K and V (2D floats). Keys and values are linear in it, K_h = W_UK,h·c and
V_h = W_UV,h·c, so a request never up-projects the cache ("absorbed" attention, as DeepSeek-V3's
`attn_impl = "absorb"`): the query moves into latent space, q̃_h = W_UK,hᵀ·q_h, scores are
q̃_h·c_t + rab, and the output is W_UV,h·(Σ_t a_t c_t). That is MQA over the latent, head dim r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import Method, TestSetting, register
from malloc_ray.methods.common.glue import (check_int, join_cached, layer_macs, macs_dict,
                                            pair_macs, self_mask, token_memory)
from malloc_ray.methods.heads import grouped_attention
from malloc_ray.model.hstu import (RelativeBias, merge_heads, pointwise_attention, split_heads,
                                   visibility)


@register
class MLA(Method):
    """Latent KV: cache c = W_DKV x (r floats per token), attend through it without expanding.

    Adapted to HSTU, and why:
    - **No SiLU on K and V.** HSTU applies SiLU to u, q, k, v; a SiLU after the up-projection
      would make K, V nonlinear in c, so every cached latent would have to be up-projected at
      every request (no absorption). K, V are therefore linear in c (as in ArkHSTU's MLA block);
      u and q keep HSTU's SiLU (they are per request token and do not touch the cache).
    - **No decoupled RoPE key.** Position enters through the T5 relative bias on the scores,
      which the latent path carries unchanged, so the whole latent is content (d_c = r, d_rope = 0).
    - **Full-rank query, no norm on the latent.** DeepSeek's low-rank query and latent RMSNorm
      save parameters or stabilise a huge model; neither changes what is cached, and the layer
      input is already LayerNormed by the block.
    - **Rank rule.** r = min(kv_rank, d_model): c is a linear map of the d-dim input, so a latent
      wider than d holds nothing more (one would cache x itself). kv_rank = 64 (the paper fit,
      d = 256) is therefore r = 32 on a d = 32 model. Use `latent_dim(cfg, hp)` for the value.

    `absorb` (default True) selects the serving path of `step`; False runs the reference path
    that up-projects every cached latent to K, V (for the equality test; same outputs). The
    full-sequence paths (`forward`, `prefill`) up-project: over N tokens that is cheaper than
    absorption whenever H·r > D.
    """

    name = "mla"
    category = "head"
    batched_append = True  # appending k at once = k single appends (contract test)
    # The default rank 64 is clipped to d = 32 on the tiny model; 8 is a real low rank.
    test_settings = (TestSetting(id="r8", hparams={"kv_rank": 8}, lengths=(19, 7, 12, 19, 4)),)

    @dataclass(frozen=True)
    class Hparams:
        kv_rank: int = 64  # latent floats per token; 64 fits the paper's 15.98 MiB (§3.1)

        def __post_init__(self):
            check_int("kv_rank", self.kv_rank, 1)

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)
        d = D = cfg.d_model
        r = self.latent_dim(cfg, self.hp)
        self.f1 = nn.Linear(d, 2 * D, bias=False)     # u, q (SiLU, as HSTU)
        self.w_dkv = nn.Linear(d, r, bias=False)      # x -> latent c (cached)
        self.w_uk = nn.Linear(r, D, bias=False)       # c -> K (no SiLU: absorbable)
        self.w_uv = nn.Linear(r, D, bias=False)       # c -> V
        self.rab = RelativeBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance)
        self.out_norm = nn.LayerNorm(D)
        self.absorb = True

    @staticmethod
    def latent_dim(cfg, hp) -> int:
        return min(hp.kv_rank, cfg.d_model)

    def project(self, x):
        u, q = F.silu(self.f1(x)).chunk(2, dim=-1)
        return u, split_heads(q, self.cfg.num_heads), self.w_dkv(x)

    def attend(self, u, q, c, q_pos, k_pos, k_valid, same, absorb: bool):
        """u (B,Nq,D), q (B,H,Nq,d_h), latents c (B,Nk,r) of every visible-or-not key."""
        h, dh = self.cfg.num_heads, self.cfg.head_dim
        mask = visibility(q_pos, k_pos, k_valid, same)
        bias = self.rab(q_pos, k_pos)
        if absorb:
            r = c.shape[-1]
            w_uk = self.w_uk.weight.view(h, dh, r)                 # K_h = c · W_UK,hᵀ
            w_uv_t = self.w_uv.weight.view(h, dh, r).transpose(1, 2)
            q_lat = torch.matmul(q, w_uk)                          # (B,H,Nq,r): D·r per row
            lat = c[:, None]                                       # one shared "KV head"
            av_lat = grouped_attention(q_lat, lat, lat, bias, mask, self.cfg.divisor)
            av = torch.matmul(av_lat, w_uv_t)                      # (B,H,Nq,d_h): D·r per row
        else:
            k, v = split_heads(self.w_uk(c), h), split_heads(self.w_uv(c), h)
            av = pointwise_attention(q, k, v, bias, mask, self.cfg.divisor)
        return u * self.out_norm(merge_heads(av))

    def forward(self, x, pos, valid):
        y, _ = self.prefill(x, pos, valid)
        return y

    def prefill(self, x, pos, valid):
        u, q, c = self.project(x)
        y = self.attend(u, q, c, pos, pos, valid, self_mask(x.shape[1], 0, x.device),
                        absorb=False)
        return y, token_memory({"latent": c}, pos, valid)

    def step(self, x, pos, memory, append):
        u, q, c = self.project(x)
        latents = torch.cat([memory.payload["latent"], c], 1)
        k_pos, k_valid, same = join_cached(memory.metadata["pos"], memory.metadata["valid"], pos)
        y = self.attend(u, q, latents, pos, k_pos, k_valid, same, absorb=self.absorb)
        if append:
            memory = token_memory({"latent": latents}, k_pos, k_valid)
        return y, memory

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        payload = n_cached * cls.latent_dim(cfg, hp) * 4                 # latent, fp32
        return payload + (n_cached * (4 + 1) if metadata else 0)  # int32 position + bool valid

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        """Absorbed request, up-projected prefill. Per token outside attention: f1 d->2D, SiLU
        on 2D, W_DKV d->r, two LayerNorms, f2 with bias. Request rows add the absorption
        (W_UKᵀ q and W_UV on the latent output, D·r each); each (row, key) pair costs
        2·H·r + H. Prefill instead up-projects every token (2·r·D) and pays Native's 2D + H."""
        d = D = cfg.d_model
        h, r = cfg.num_heads, cls.latent_dim(cfg, hp)
        tok_mm = d * 2 * D + d * r + D * d
        tok = tok_mm + 2 * D + 2 * d + 2 * D + d
        keys = n_cached + q
        row = (tok + 2 * D * r, tok_mm + 2 * D * r)   # + the absorption (request) or up-projection
        latent_pair = (2 * h * r + h, 2 * h * r)
        return macs_dict(layer_macs(row, latent_pair, q, q * keys),
                         layer_macs(row, pair_macs(cfg), n_cached, n_cached * n_cached))
