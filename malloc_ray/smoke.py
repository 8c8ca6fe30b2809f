"""What `--smoke-test` means, in one place: every entry point shrinks its work through these.

A smoke run proves the code path end to end in seconds to minutes; its numbers mean nothing.
A study spec may also carry its own `smoke:` section (study/spec.py `smoke_spec`), which says
*what* to run instead (e.g. synthetic stand-ins for data CI lacks); this module says *how
small* any run gets.
"""

from __future__ import annotations

# Synthetic datasets a smoke study prepares are capped at this size.
SYNTHETIC_CAPS = {"users": 120, "max_len": 48}
# Optuna trials per dataset in a smoke search.
SEARCH_SAMPLES = 2


def trial_overrides(raw: dict) -> dict:
    """Shrink any trial to seconds: one short epoch of a narrow model."""
    return {"epochs": 1, "max_steps_per_epoch": 3, "d_model": min(raw.get("d_model", 64), 32),
            "num_heads": min(raw.get("num_heads", 4), 4),
            "max_len": min(raw.get("max_len", 128), 32)}


def grid(depths: list[int], seeds: list[int]) -> tuple[list[int], list[int]]:
    """Every method and dataset, but the two shallowest depths and one seed."""
    return sorted(depths)[:2], seeds[:1]


def synthetic_recipe(recipe: dict) -> dict:
    """A synthetic prepare recipe capped in users and history length; others unchanged."""
    if recipe.get("source") != "synthetic":
        return recipe
    return {**recipe, **{k: min(recipe.get(k, cap), cap) for k, cap in SYNTHETIC_CAPS.items()}}


def study_name(name: str) -> str:
    """A smoke study gets its own directory and MLflow experiment, never the real one's."""
    return f"{name}-smoke"
