"""w/o Mem: keep nothing, recompute the whole sequence for every request (docs/methods/wo_mem.md).

Same layer as Native; the difference is the serving path. Only the raw history ids and labels
are stored (not counted as memory) and each request runs [history; candidates] through every
layer. Its scores must equal Native's cached ones; its cost is the full quadratic pass.
"""

from __future__ import annotations

from malloc_ray.methods.base import TestSetting, register
from malloc_ray.methods.common.glue import layer_macs, macs_dict, pair_macs, token_macs
from malloc_ray.methods.native import HSTUAttention


@register
class WoMem(HSTUAttention):
    name = "wo_mem"
    category = "none"
    recompute = True
    lossless = True  # Native's layer, recomputed: the same sums
    batched_append = True  # appending k at once = k single appends (contract test)
    test_settings = (TestSetting(id="ragged", hparams={}, lengths=(23, 9, 5, 17, 23, 12)),)

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        n = n_cached + q  # full-matrix count over history and candidates, as the paper does
        return macs_dict(layer_macs(token_macs(cfg), pair_macs(cfg), n, n * n), (0, 0))
