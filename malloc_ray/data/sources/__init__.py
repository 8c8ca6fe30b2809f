"""Readers that turn one input format into an `InteractionLog` (raw ids, file order).

`SOURCES` maps the name used by `prepare` and the CLI to the reader.
"""

from malloc_ray.data.sources.interactions import InteractionLog, read_log
from malloc_ray.data.sources.movielens import read_inter
from malloc_ray.data.sources.synthetic import PROFILES, generate, item_category

SOURCES = {"synthetic": generate, "interactions": read_log, "movielens": read_inter}

__all__ = ["InteractionLog", "PROFILES", "SOURCES", "generate", "item_category", "read_inter",
           "read_log"]
