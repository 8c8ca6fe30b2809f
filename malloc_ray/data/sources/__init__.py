"""Readers that turn one input format into an `InteractionLog` (raw ids, file order).

`SOURCES` maps the name used by `prepare` and the CLI to the reader.
"""

from malloc_ray.data.sources.interactions import InteractionLog, read_log
from malloc_ray.data.sources.movielens import read_inter
from malloc_ray.data.sources.reczoo import read_amazon_x1, read_kuaivideo_x1, read_microvideo_x1
from malloc_ray.data.sources.reczoo_x2 import read_longctr_x2
from malloc_ray.data.sources.sequences import read_sequences
from malloc_ray.data.sources.synthetic import PROFILES, check_args, generate, item_category

SOURCES = {"synthetic": generate, "interactions": read_log, "movielens": read_inter,
           "kuaivideo_x1": read_kuaivideo_x1, "microvideo_x1": read_microvideo_x1,
           "amazon_x1": read_amazon_x1, "longctr_x2": read_longctr_x2,
           "sequences": read_sequences}
# Checks of a source's options that need no reading (same signature as the reader).
SOURCE_CHECKS = {"synthetic": check_args}

__all__ = ["InteractionLog", "PROFILES", "SOURCES", "SOURCE_CHECKS", "check_args", "generate",
           "item_category", "read_amazon_x1", "read_inter", "read_kuaivideo_x1", "read_log",
           "read_longctr_x2", "read_microvideo_x1", "read_sequences"]
