"""MovieLens in RecBole's atomic `.inter` layout.

A tab-separated file whose header fields carry a type suffix, e.g.
`user_id:token	item_id:token	rating:float	timestamp:float`. The click label is
rating >= threshold (default 4, the usual "liked" cut for 1-5 star ratings).
"""

from __future__ import annotations

from pathlib import Path

from malloc_ray.data.sources.interactions import InteractionLog, read_header, read_log
from malloc_ray.errors import InputError

FIELDS = {"user": "user_id", "item": "item_id", "rating": "rating", "time": "timestamp"}


def read_inter(path: str | Path, *, rating_threshold: float = 4.0) -> InteractionLog:
    """Read a RecBole `.inter` file; ids must be non-negative integers (as in MovieLens)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    by_field = {name.split(":", 1)[0]: name for name in read_header(path, "\t")}
    cols = {}
    for role, field in FIELDS.items():
        if field not in by_field:
            raise InputError(f"RecBole field {field!r} not in header "
                             f"({', '.join(by_field.values())})", file=str(path), key=field)
        cols[role] = by_field[field]
    return read_log(path, user_col=cols["user"], item_col=cols["item"], time_col=cols["time"],
                    label_col=None, rating_col=cols["rating"], rating_threshold=rating_threshold,
                    delimiter="\t")
