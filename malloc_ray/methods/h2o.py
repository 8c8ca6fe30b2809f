"""H2O: heavy hitters + recent tokens (docs/methods/h2o.md), post-hoc on Native's weights.

Per layer, user and head the memory keeps `budget` tokens: the `recent` most recent history
tokens, plus the `budget - recent` others with the largest accumulated attention.

Adapted to pointwise SiLU HSTU attention:
- SiLU weights are signed, so a token's score accumulates |A| (not A) over the queries
  that saw it;
- scores are normalised by how many queries could see each key (kvpress
  ObservedAttentionPress), which removes H2O's bias toward early tokens;
- one-shot prefill (variant (a) of §4.7): the history is attended exactly, then pruned once.
  H2O proper evicts while streaming, so its later history tokens see a pruned cache;
  that variant is not implemented;
- tokens are scored one by one (item and label tokens separately); the `granularity=pair`
  option of §4.7 is not implemented.
Appending interactions (step with append=True) is H2O's own update: the new rows' |A| are added
to the kept tokens' scores, the new tokens get the column sums of their own rows, and the
memory is evicted back to `budget` by the same rule. Running sums and query counts are kept as
metadata (`score`, `seen`) so the normalised score stays exact across appends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malloc_ray.methods.base import TestSetting, register
from malloc_ray.methods.common.glue import check_int
from malloc_ray.methods.common.prune import INF, TokenPrune, most_recent


@dataclass(frozen=True)
class H2OHparams:
    budget: int = 32          # tokens kept per layer, user and head
    recent: int | None = None  # always-kept most recent tokens; None -> budget // 2

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        if self.recent is None:
            object.__setattr__(self, "recent", self.budget // 2)
        check_int("recent", self.recent, 0, self.budget)


@register
class H2O(TokenPrune):
    """Heavy hitters by normalised accumulated |A| plus a recent window (see module doc)."""

    name = "h2o"
    Hparams = H2OHparams
    state_keys = ("score", "seen")  # running sum of |A| (fp32), queries that saw it (int32)
    # Budgets below the 40 cached tokens of the longest users (the default 32 keeps nearly
    # all): recent = budget // 2, no recent window (heavy hitters only), recent only.
    test_settings = (
        TestSetting(id="b8", hparams={"budget": 8}, lengths=(21, 8, 14, 21)),
        TestSetting(id="b12r0", hparams={"budget": 12, "recent": 0}, lengths=(21, 8, 14, 21)),
        TestSetting(id="b10r10", hparams={"budget": 10, "recent": 10}, lengths=(21, 8, 14, 21)),
    )

    def priority(self, score, seen, pos, valid):
        heavy = score / seen.clamp(min=1)
        return heavy.masked_fill(most_recent(pos, valid, self.hp.recent), INF)

    def prefill_priority(self, w, mask, pos, valid):
        score = w.abs().sum(-2)                                        # (B, H, N)
        seen = mask.sum(-2, dtype=torch.int32).expand_as(score)       # queries that saw each key
        return self.priority(score, seen, pos, valid), {"score": score, "seen": seen}

    def append_priority(self, memory, w, mask, pos, valid):
        n_new = w.shape[-2]
        old = memory.metadata
        pad = old["score"].new_zeros(*old["score"].shape[:2], n_new)
        score = torch.cat([old["score"], pad], -1) + w.abs().sum(-2)
        seen = torch.cat([old["seen"], pad.to(torch.int32)], -1) + mask.sum(-2, dtype=torch.int32)
        return self.priority(score, seen, pos, valid), {"score": score, "seen": seen}

    @classmethod
    def scoring_macs(cls, cfg, hp, n_cached):
        # one add per |A| entry for the column sums, one division per key (per head)
        return cfg.num_heads * (n_cached * n_cached + n_cached)
