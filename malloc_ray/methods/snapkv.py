"""SnapKV: keep what an observation window attends to (docs/methods/snapkv.md), post-hoc on Native.

Per layer, user and head the memory keeps `budget` tokens: the `window` most recent history
tokens (the observation window itself) plus the `budget - window` earlier tokens that the
window's queries attend to most. As in SnapKV / kvpress SnapKVPress, a token's score is the
mean over the window queries of its attention weight, smoothed along the token axis with
`avg_pool1d(kernel, padding=kernel // 2)` (zero padding counted, as the references do).

Adapted to pointwise SiLU HSTU attention and to serving:
- SiLU weights are signed, so scores use |A|;
- the observation window is the last `window` HISTORY tokens (the memory is built before the
  target is known); using the target's query would make the memory request-dependent;
- tokens are scored one by one; the `granularity=pair` option of §4.8 is not implemented;
- SnapKV compresses once after prefill. Re-compression rule for appended interactions here:
  the new tokens are appended and, if a head then holds more than `budget` tokens, it is
  re-compressed at once by the same rule, the observation queries being the last
  min(window, appended) appended tokens (only their queries exist; older tokens keep K and V
  only) and the always-kept window the `window` most recent tokens. Pooling then runs along
  the kept-token axis, whose neighbours need not be adjacent positions. The memory thus never
  exceeds `budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from malloc_ray.methods.base import TestSetting, register
from malloc_ray.methods.common.glue import check_int
from malloc_ray.methods.common.prune import INF, TokenPrune


@dataclass(frozen=True)
class SnapKVHparams:
    budget: int = 32   # tokens kept per layer, user and head (window included)
    window: int = 8    # observation window: the last history tokens, always kept
    kernel: int = 5    # avg-pool smoothing kernel (odd; 1 = no smoothing)

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        check_int("window", self.window, 1, self.budget)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (avg_pool1d with padding kernel//2 keeps the "
                             f"length only then), got {self.kernel}")


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """avg_pool1d along the last axis of (B, H, N), zero padding counted (SnapKV/kvpress)."""
    if kernel == 1 or scores.shape[-1] == 0:
        return scores
    b, h, n = scores.shape
    return F.avg_pool1d(scores.reshape(b * h, 1, n), kernel, stride=1,
                        padding=kernel // 2).reshape(b, h, n)


def window_scores(w: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """Priority (B, H, N) from the attention rows w (B, H, Nq, N) over a position-ordered axis.

    The last min(window, Nq) rows observe; the last `window` columns are the window (+inf),
    the others get the pooled mean |A| of the observing rows. Padding rows and columns carry
    exactly zero weight, so left padding acts as avg_pool1d's zero padding.
    """
    n = w.shape[-1]
    win = min(window, n)
    observed = w[..., w.shape[-2] - min(window, w.shape[-2]):, :].abs().mean(-2)
    prefix = pool_scores(observed[..., : n - win], kernel)
    return torch.cat([prefix, torch.full_like(observed[..., n - win:], INF)], -1)


@register
class SnapKV(TokenPrune):
    """Observation-window selection with pooled |A| (see module doc)."""

    name = "snapkv"
    Hparams = SnapKVHparams
    # Budgets below the 40 cached tokens of the longest users: the window fills the budget,
    # raw scores (kernel 1), and a wide smoothing kernel over a short window.
    test_settings = (
        TestSetting(id="b8w8", hparams={"budget": 8, "window": 8}, lengths=(21, 8, 14, 21)),
        TestSetting(id="b12w3k1", hparams={"budget": 12, "window": 3, "kernel": 1},
                    lengths=(21, 8, 14, 21)),
        TestSetting(id="b16w2k7", hparams={"budget": 16, "window": 2, "kernel": 7},
                    lengths=(21, 8, 14, 21)),
    )

    def prefill_priority(self, w, mask, pos, valid):
        return window_scores(w, self.hp.window, self.hp.kernel), {}

    def append_priority(self, memory, w, mask, pos, valid):
        # The last columns of [memory; new] are the most recent tokens: the window is always
        # kept, so the memory's last valid columns are the latest history tokens.
        return window_scores(w, self.hp.window, self.hp.kernel), {}

    @classmethod
    def scoring_macs(cls, cfg, hp, n_cached):
        # mean |A| of the window rows, then a kernel-wide average per prefix token (per head)
        win = min(hp.window, n_cached)
        return cfg.num_heads * (win * n_cached + (n_cached - win) * hp.kernel)
