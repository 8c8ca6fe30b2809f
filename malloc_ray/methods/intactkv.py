"""IntactKV: keep pivot tokens in full precision, quantize the rest (docs/methods/intactkv.md).

Post-hoc on Native's weights, with no retraining. In the LLM paper the pivots are a shared
prefix ([BOS] or the system prompt) whose KV is computed once, in full precision, for every
request. A CTR user sequence has no shared prefix, and adding a learned [BOS] token would need
retraining, so the pivots here are the first `pivots` history tokens of each user (default 1:
the item token i_1): their K,V stay fp32, bit-identical to Native's, and are counted per user.

Every other token is quantized per token, keys and values alike, over groups of `group_size`
channels (asymmetric min-max, as the reference's per-token `UniformAffineQuantizer`), as soon
as it is stored: per-token groups need no residual window, so IntactKV has none. The cache
layout and serving path are KIVI's (`kivi.py`) with pivots instead of a residual window and
keys grouped along channels instead of tokens. Details: docs/methods/intactkv.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from malloc_ray.methods.common import quant
from malloc_ray.methods.base import TestSetting, register
from malloc_ray.methods.common.glue import check_int
from malloc_ray.methods.kivi import KIVI


@register
class IntactKV(KIVI):
    name = "intactkv"
    category = "precision"
    workflow = "post-hoc"

    @dataclass(frozen=True)
    class Hparams:
        bits: int = 2         # 2, 4, 8, or 16 = keep fp32
        group_size: int = 32  # channels per quantization group (per token, keys and values)
        pivots: int = 1       # a user's first history tokens kept fp32

        def __post_init__(self):
            quant.check_bits(self.bits)
            check_int("group_size", self.group_size, 1)
            check_int("pivots", self.pivots, 0)

    key_groups_along_tokens = False  # per-token keys: every token is quantized on its own
    # Every token but the pivots is quantized whatever the length; groups smaller than
    # d = 32 give several scales per token (8: even, 5: a short last group, 4-bit).
    test_settings = (
        TestSetting(id="g8p2", hparams={"group_size": 8, "pivots": 2},
                    lengths=(21, 8, 14, 1, 21, 3)),
        TestSetting(id="b4g5p1", hparams={"bits": 4, "group_size": 5, "pivots": 1},
                    lengths=(21, 8, 14, 1, 21, 3)),
    )

    @classmethod
    def layout(cls, hp):
        return hp.pivots, 0, 1
