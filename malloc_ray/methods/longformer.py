"""Longformer (docs/methods/longformer.md): causal sliding window plus a global target (see the class)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from malloc_ray.methods.base import TestSetting, register
from malloc_ray.methods.common.chunks import previous_chunks, target_rows
from malloc_ray.methods.common.glue import (check_bool, check_int, layer_macs, macs_dict,
                                            pair_macs, pointwise_weights, token_macs)
from malloc_ray.methods.native import HSTUAttention
from malloc_ray.model.hstu import merge_heads, pointwise_attention, relative_bucket, visibility


def trailing_targets(target: torch.Tensor) -> int:
    """How many trailing columns hold the targets; raises if a target sits elsewhere."""
    t = int(target.sum(1).max())
    if t and bool(target[:, : target.shape[1] - t].any()):
        raise ValueError("the target tokens (last position of each user) must be the last "
                         "columns of the sequence")
    return t


def window_geometry(n: int, window: int) -> tuple[int, int, int]:
    """(chunk length, number of chunks, previous chunks looked at) for n tokens."""
    c = max(1, min(window, n))
    n_chunks = math.ceil(n / c)
    return c, n_chunks, min(1, n_chunks - 1)


@register
class Longformer(HSTUAttention):
    """Longformer: causal sliding window plus the target as a global token (docs/methods/longformer.md).

    Every token attends to itself and the `window` tokens just before it (positions p - w .. p - 1),
    computed chunk by chunk as allenai's `sliding_chunks` does (a chunk of w queries against its own
    chunk and the previous one, masked to the band). The target - the token(s) at the user's last
    position - is a global token: it attends to the whole history with the ordinary HSTU mask.
    Nothing is kept per user (recompute, as in the paper): a request re-runs [history; candidates].

    Adapted to causal pointwise HSTU attention:
    - The window is one-sided. Longformer's symmetric window would show y_t to i_t (label leakage);
      `sliding_chunks` does not support autoregressive mode at all.
    - The global token attends to everything but nothing attends to it: it is the last token, and
      attending to it would be non-causal. Several candidates of one request share the last
      position; each is global, sees the history and itself, never the others.
    - The divisor stays n = 2 max_len (the rest of the model's convention). `divide_by_window`
      divides the windowed rows by w instead (an ablation against the w/n shrinkage the note
      blames for divergence at depth); global rows always divide by n.
    - Same parameters (and names) as Native, so Native weights load into it unchanged.
    """

    name = "longformer"
    category = "token-merge"
    recompute = True
    batched_append = True  # appending k at once = k single appends (contract test)
    # The default window (64) covers nearly every test sequence; 5 is a real band over up to
    # 61 tokens (several chunks).
    test_settings = (TestSetting(id="w5", hparams={"window": 5}, lengths=(31, 8, 14, 21)),)

    @dataclass(frozen=True)
    class Hparams:
        window: int = 64                 # w: earlier tokens each token sees (32 interactions)
        divide_by_window: bool = False   # ablation: windowed rows divide by w instead of n

        def __post_init__(self):
            check_int("window", self.window, 1)
            check_bool("divide_by_window", self.divide_by_window)

    def windowed(self, q, k, v, pos, valid):
        """Banded causal attention: each row sees itself and the w tokens before it."""
        b, h, n, dh = q.shape
        w = self.hp.window
        c, n_chunks, m = window_geometry(n, w)
        extra = n_chunks * c - n
        idx = torch.arange(n_chunks * c, device=q.device).expand(b, -1)
        valid = F.pad(valid, (0, extra), value=False)
        # positions continue past both ends (those slots are masked), so that with left padding
        # every row has the same distances and the bias is looked up once for the batch
        step = torch.arange(1, m * c + extra + 1, device=pos.device)
        pos = torch.cat([pos[:, :1] - step[: m * c].flip(0), pos, pos[:, -1:] + step[:extra]], 1)

        def chunked(t):  # (B, H, N, dh) -> (B, H, chunks, c, dh)
            return F.pad(t, (0, 0, 0, extra)).view(b, h, n_chunks, c, dh)

        qc = chunked(q)
        kw = previous_chunks(chunked(k), m, 2, 0.0)   # (B, H, chunks, (m+1)c, dh)
        vw = previous_chunks(chunked(v), m, 2, 0.0)
        q_pos, q_idx = pos[:, m * c:].view(b, n_chunks, c), idx.view(b, n_chunks, c)
        k_pos = torch.cat([pos[:, j * c: (j + n_chunks) * c].view(b, n_chunks, c)
                           for j in range(m + 1)], 2)
        k_idx = previous_chunks(q_idx, m, 1, -1)
        k_valid = previous_chunks(valid.view(b, n_chunks, c), m, 1, False)

        dist = q_pos[..., :, None] - k_pos[..., None, :]              # (B, chunks, c, (m+1)c)
        band = (dist > 0) & (dist <= w)
        mask = (band | (q_idx[..., :, None] == k_idx[..., None, :])) & k_valid[..., None, :]
        if bool((dist == dist[:1]).all()):
            dist = dist[:1]
        bias = self.rab.table(relative_bucket(dist, self.rab.num_buckets, self.rab.max_distance))
        scores = torch.matmul(qc, kw.transpose(-1, -2)) + bias.permute(0, 4, 1, 2, 3)
        divisor = float(w) if self.hp.divide_by_window else self.cfg.divisor
        weights = pointwise_weights(scores, mask[:, None], divisor)
        return torch.matmul(weights, vw).flatten(2, 3)[:, :, :n]

    def forward(self, x, pos, valid):
        u, q, k, v = self.project(x)
        av = self.windowed(q, k, v, pos, valid)
        target = target_rows(pos, valid)
        t = trailing_targets(target)
        if t:  # the global rows: the target(s) attend to the whole history
            n = x.shape[1]
            same = torch.eye(n, dtype=torch.bool, device=x.device)[n - t:]
            q_pos = pos[:, n - t:]
            glob = pointwise_attention(q[:, :, n - t:], k, v, self.rab(q_pos, pos),
                                       visibility(q_pos, pos, valid, same), self.cfg.divisor)
            is_global = target[:, None, n - t:, None]
            av = torch.cat([av[:, :, : n - t], torch.where(is_global, glob, av[:, :, n - t:])], 2)
        return u * self.out_norm(merge_heads(av))

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        """A request re-runs all N = n_cached + q tokens: the band is computed in chunks of w
        (each chunk against itself and the previous chunk, 2w keys per query, of which w + 1
        are used), plus the q global rows against all N keys."""
        n = n_cached + q
        c, n_chunks, m = window_geometry(n, hp.window)
        pairs = n_chunks * c * (m + 1) * c + q * n
        return macs_dict(layer_macs(token_macs(cfg), pair_macs(cfg), n, pairs), (0, 0))
