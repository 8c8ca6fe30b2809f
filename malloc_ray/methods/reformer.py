"""Reformer (docs/methods/reformer.md): shared-QK LSH attention. See the class docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from malloc_ray.methods.base import Method, TestSetting, register
from malloc_ray.methods.common.chunks import previous_chunks, target_rows
from malloc_ray.methods.common.glue import (check_bool, check_int, hstu_layers, layer_macs,
                                            macs_dict, pair_macs, pointwise_weights)
from malloc_ray.model.hstu import HSTUConfig, merge_heads, relative_bucket, split_heads


def resolve_buckets(cfg: HSTUConfig, hp) -> int:
    """n_buckets, or by default N / bucket_size for N = 2 max_len (even; 1 if N < 2 bucket_size)."""
    if hp.n_buckets is not None:
        return hp.n_buckets
    n = 2 * cfg.max_len
    return 2 * (n // (2 * hp.bucket_size)) or 1


def lookback_chunks(c: int, bucket_size: int, n_chunks: int, ties: int) -> int:
    """Previous chunks of length c a query must see to cover its window in the sorted order.

    Its visible keys have a bucket rank >= (rank // bucket_size - 1) * bucket_size, i.e. at most
    2 bucket_size - 1 places back, plus up to ties - 1 tied candidates sorted between.
    """
    return min(n_chunks - 1, math.ceil((2 * bucket_size + ties - 2) / c))


def shared_token_macs(cfg: HSTUConfig) -> tuple[int, int]:
    """(all, matmul-only) MACs per token outside the pairs: f1 d -> 3D, SiLU on 3D, two
    LayerNorms, f2 with bias, and the key normalisation (D)."""
    d = D = cfg.d_model
    matmul = d * 3 * D + D * d
    return matmul + 3 * D + 2 * d + 2 * D + d + D, matmul


@register
class Reformer(Method):
    """Reformer: shared-QK LSH attention (docs/methods/reformer.md).

    f1 makes three streams u, qk, v (d -> 3D). Keys are the queries normalised to unit length
    (shared QK). Each of `n_hashes` rounds hashes the keys into `n_buckets` buckets with fixed
    random rotations (argmax over [xR, -xR]), groups each bucket's tokens in time order, cuts
    every bucket into chunks of `bucket_size` tokens, and lets a token attend to the earlier
    tokens of its bucket in its own chunk and the previous one. The rounds' outputs are
    averaged. Nothing is kept per user (recompute, as in the paper): a request re-runs
    [history; candidates].

    Adapted to causal pointwise HSTU attention, and why:
    - Chunks are counted inside each bucket (chunk = rank among the bucket's earlier tokens //
      bucket_size), not cut from the globally sorted sequence as in the paper. A global cut lets
      a later token that hashes into a lower bucket shift every chunk boundary after it, so an
      item's output would depend on later labels (label leakage). Counted inside the bucket,
      which keys a token sees depends only on earlier tokens. It is computed on the sorted
      sequence with enough previous chunks to cover that window (see `lookback_chunks`).
    - Causality uses the original positions after sorting; padding is hashed to its own group.
    - No softmax normaliser exists to merge rounds with, so their outputs are averaged (a key seen
      in every round keeps its full weight, one seen in a single round gets 1/n_hashes).
    - A token's own (shared-QK) score is the largest; as in the paper it is masked unless nothing
      else is visible, except for the target row(s), which keep the diagonal as HSTU does
      (`mask_self=False` keeps it everywhere).
    - Rotations are drawn once from torch's RNG at construction (the model seed) and kept as a
      buffer in the state dict: fixed in training and serving, so a request is deterministic.
    - The T5 relative bias is kept (from original positions).
    - Candidates of one request share the last position: each is ranked among the earlier tokens
      only, so they never see or shift one another and a score does not depend on the slate.
    """

    name = "reformer"
    category = "sequence"
    recompute = True
    batched_append = True  # appending k at once = k single appends (contract test)
    # The default bucket_size 64 gives 2 max_len / 64 -> 1 bucket on the tiny model (no
    # hashing); 4 buckets cut into chunks of 3, over 2 rounds.
    test_settings = (TestSetting(id="b3n4h2", hparams={"bucket_size": 3, "n_buckets": 4,
                                                       "n_hashes": 2},
                                 lengths=(31, 8, 14, 21)),)

    @dataclass(frozen=True)
    class Hparams:
        bucket_size: int = 64          # chunk length inside a bucket
        n_buckets: int | None = None   # None: 2 max_len / bucket_size (rounded to even)
        n_hashes: int = 2              # hash rounds, outputs averaged
        mask_self: bool = True         # mask the own score unless nothing else is visible

        def __post_init__(self):
            check_int("bucket_size", self.bucket_size, 1)
            check_int("n_hashes", self.n_hashes, 1)
            check_bool("mask_self", self.mask_self)
            nb = self.n_buckets
            if nb is not None:
                check_int("n_buckets", nb, 1)
                if nb > 1 and nb % 2:
                    raise ValueError(f"n_buckets must be 1 or an even integer >= 2 (hashing "
                                     f"takes argmax over [xR, -xR]), got {nb!r}")

    def __init__(self, cfg: HSTUConfig, hp=None):
        super().__init__(cfg, hp)
        self.f1, self.rab, self.out_norm = hstu_layers(cfg, 3 * cfg.d_model)  # u, qk, v
        self.n_buckets = resolve_buckets(cfg, self.hp)
        rotations = torch.randn(self.hp.n_hashes, cfg.head_dim, self.n_buckets // 2)
        self.register_buffer("rotations", rotations)  # fixed: saved, never trained or redrawn

    def hash(self, keys):
        """(B, H, N, dh) unit keys -> (B, H, R, N) bucket ids."""
        b, h, n, _ = keys.shape
        if self.n_buckets == 1:
            return torch.zeros(b, h, self.hp.n_hashes, n, dtype=torch.long, device=keys.device)
        rotated = torch.matmul(keys[:, :, None], self.rotations)  # (B, H, R, N, n_buckets/2)
        return torch.cat([rotated, -rotated], -1).argmax(-1)

    def forward(self, x, pos, valid):
        b, n, _ = x.shape
        h, r, size, nb = self.cfg.num_heads, self.hp.n_hashes, self.hp.bucket_size, self.n_buckets
        u, qk, v = F.silu(self.f1(x)).chunk(3, dim=-1)
        q, v = split_heads(qk, h), split_heads(v, h)
        k = F.normalize(q, dim=-1)
        dh = q.shape[-1]
        target = target_rows(pos, valid)
        ties = int(target.sum(1).max())

        # padding (left padding, and the tail that fills the last chunk) is group nb, sorted last
        group = torch.where(valid[:, None, None], self.hash(k), nb)           # (B, H, R, N)
        c = max(1, min(size, n))
        n_chunks = math.ceil(n / c)
        m = lookback_chunks(c, size, n_chunks, ties)
        extra, n_pad = n_chunks * c - n, n_chunks * c
        q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        pos, target = F.pad(pos, (0, extra)), F.pad(target, (0, extra), value=False)
        group = F.pad(group, (0, extra), value=nb)

        # sort each round by (group, time); rank = earlier tokens of the same group
        group, order = torch.sort(group, dim=-1, stable=True)
        s_pos = pos[:, None, None].expand_as(order).gather(-1, order)
        idx = torch.arange(n_pad, device=x.device)
        counts = torch.zeros(b, h, r, nb + 1, dtype=torch.long, device=x.device)
        counts.scatter_add_(-1, group, torch.ones_like(group))
        start = (counts.cumsum(-1) - counts).gather(-1, group)
        new = torch.ones_like(group, dtype=torch.bool)  # first of a run of tied positions
        new[..., 1:] = (group[..., 1:] != group[..., :-1]) | (s_pos[..., 1:] != s_pos[..., :-1])
        tie_start = torch.cummax(torch.where(new, idx, 0), -1).values
        chunk_in_bucket = (tie_start - start) // size   # tied candidates share their rank

        def gather(t):  # (B, H, Np, dh) -> sorted, chunked (B, H, R, chunks, c, dh)
            t = t[:, :, None].expand(b, h, r, n_pad, dh)
            return t.gather(-2, order[..., None].expand(b, h, r, n_pad, dh)).view(
                b, h, r, n_chunks, c, dh)

        def chunk(t):
            return t.view(b, h, r, n_chunks, c)

        def window(t, fill):
            return previous_chunks(chunk(t), m, 3, fill)

        qs = gather(q)
        ks = previous_chunks(gather(k), m, 3, 0.0)   # (B, H, R, chunks, W, dh)
        vs = previous_chunks(gather(v), m, 3, 0.0)
        q_grp, k_grp = chunk(group)[..., :, None], window(group, -1)[..., None, :]
        q_pos, k_pos = chunk(s_pos)[..., :, None], window(s_pos, 0)[..., None, :]
        q_idx, k_idx = chunk(order)[..., :, None], window(order, -1)[..., None, :]
        q_ch, k_ch = chunk(chunk_in_bucket)[..., :, None], window(chunk_in_bucket, -2)[..., None, :]
        real = q_grp < nb
        other = real & (k_grp == q_grp) & (k_pos < q_pos) & (k_ch >= q_ch - 1)
        own = real & (k_idx == q_idx)
        if self.hp.mask_self:
            is_target = target[:, None, None].expand_as(order).gather(-1, order)
            own = own & (chunk(is_target)[..., :, None] | ~other.any(-1, keepdim=True))
        mask = other | own

        # relative bias per head: the bucket is constant from max_distance on, so look the
        # distances up in a (heads, max_distance + 1) table instead of bucketing every pair
        far = self.rab.max_distance
        lut = self.rab.table(relative_bucket(torch.arange(far + 1, device=x.device),
                                             self.rab.num_buckets, far)).t()
        heads = torch.arange(h, device=x.device).view(1, h, 1, 1, 1, 1)
        bias = lut[heads, (q_pos - k_pos).clamp(0, far)]
        scores = torch.matmul(qs, ks.transpose(-1, -2)) + bias
        weights = pointwise_weights(scores, mask, self.cfg.divisor)
        out = torch.matmul(weights, vs).view(b, h, r, n_pad, dh)
        # back to time order, average the rounds
        unsorted = torch.empty_like(out).scatter_(-2, order[..., None].expand_as(out), out)
        av = unsorted.mean(2)[:, :, :n]
        return u * self.out_norm(merge_heads(av))

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        """A request re-runs N = n_cached + q tokens: shared-QK projections, hashing (N D nb/2
        per round), and per round chunks of c = min(bucket_size, N) queries against their own
        and m previous chunks (m from `lookback_chunks`, 2 for one candidate)."""
        tok = shared_token_macs(cfg)
        n = n_cached + q
        nb, size, D = resolve_buckets(cfg, hp), hp.bucket_size, cfg.d_model
        c = max(1, min(size, n))
        n_chunks = math.ceil(n / c)
        m = lookback_chunks(c, size, n_chunks, q)
        pairs = hp.n_hashes * n_chunks * c * (m + 1) * c
        hashing = hp.n_hashes * n * D * (nb // 2) if nb > 1 else 0
        return macs_dict(layer_macs(tok, pair_macs(cfg), n, pairs, (hashing, hashing)), (0, 0))
