"""The glue every method repeated, written once (tests/test_method_helpers.py checks each).

Each helper is the exact op sequence the methods typed out before, in the same order, so a
method built on it computes the same numbers bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import LayerMemory
from malloc_ray.model.hstu import HSTUConfig, RelativeBias


# -- hyperparameter checks (for `Hparams.__post_init__`) ------------------------------------
def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """An int in [low, high]. bool is an int subclass: `window: true` in a YAML would
    silently mean 1, so it is refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_bool(name: str, value) -> None:
    """A real bool: a flag given as 1 or "yes" is a typo, not a choice."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


# -- attention ------------------------------------------------------------------------------
def pointwise_weights(scores: torch.Tensor, mask: torch.Tensor | None,
                      divisor: float) -> torch.Tensor:
    """HSTU's weights A = SiLU(scores) / n, masked (None: unmasked), no softmax.

    The ops of `hstu.pointwise_attention_reference`, in its order, for the methods that build
    the scores their own way (chunks, groups, buckets) or need the weights themselves.
    """
    weights = F.silu(scores) / divisor
    return weights if mask is None else weights * mask


def self_mask(n_new: int, n_old: int, device) -> torch.Tensor:
    """`same` (n_new, n_old + n_new) for n_new query tokens placed after n_old kept keys:
    each query is its own key (candidates share a position, so `visibility` needs this)."""
    return torch.cat([torch.zeros(n_new, n_old, dtype=torch.bool, device=device),
                      torch.eye(n_new, dtype=torch.bool, device=device)], 1)


def join_cached(mem_pos: torch.Tensor, mem_valid: torch.Tensor, pos: torch.Tensor):
    """Key positions and validity of [kept tokens; own tokens], and the `same` mask.

    mem_pos, mem_valid (B, M) as stored, or (B, H, M) when each head keeps its own tokens;
    pos (B, N) the new tokens' positions (they are all valid). Every cached method's `step`
    attends over exactly these keys.
    """
    own = pos if mem_pos.dim() == 2 else pos[:, None].expand(*mem_pos.shape[:2], pos.shape[1])
    k_pos = torch.cat([mem_pos.to(pos.dtype), own], -1)
    k_valid = torch.cat([mem_valid, torch.ones_like(own, dtype=torch.bool)], -1)
    return k_pos, k_valid, self_mask(pos.shape[1], mem_pos.shape[-1], pos.device)


def token_memory(payload: dict[str, torch.Tensor], pos: torch.Tensor,
                 valid: torch.Tensor) -> LayerMemory:
    """A memory of per-token payload plus each token's position (int32, the 4 bytes that
    `memory_bytes` counts) and validity flag: what Native-like caches keep."""
    return LayerMemory(payload=payload, metadata={"pos": pos.to(torch.int32), "valid": valid})


def hstu_layers(cfg: HSTUConfig, f1_width: int):
    """Native's f1 (d -> f1_width, no bias), relative bias and output LayerNorm, created in
    this order: the order a seed draws Native's weights in, kept by the methods reusing them."""
    return (nn.Linear(cfg.d_model, f1_width, bias=False),
            RelativeBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance),
            nn.LayerNorm(cfg.d_model))


# -- costs ----------------------------------------------------------------------------------
def token_macs(cfg: HSTUConfig) -> tuple[int, int]:
    """(all counted ops, matmul-only) MACs per token per layer outside the attention pairs.

    f1 d->4D (no bias), SiLU on 4D, two LayerNorms (2 ops per element), f2 D->d with bias.
    Gating, bias adds and residuals are elementwise and not counted (ptflops convention).
    """
    d = D = cfg.d_model
    matmul = d * 4 * D + D * d
    return matmul + 4 * D + 2 * d + 2 * D + d, matmul


def pair_macs(cfg: HSTUConfig) -> tuple[int, int]:
    """(all, matmul-only) MACs per (query, key) pair per layer: QK^T, SiLU per head, A.V."""
    D, H = cfg.d_model, cfg.num_heads
    return 2 * D + H, 2 * D


def layer_macs(tok: tuple[int, int], pair: tuple[int, int], tokens: int, pairs: int,
               extra: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(all, matmul-only) MACs of `tokens` token rows and `pairs` (query, key) pairs at the
    per-token and per-pair costs `tok` and `pair`, plus `extra` (all, matmul)."""
    return (tokens * tok[0] + pairs * pair[0] + extra[0],
            tokens * tok[1] + pairs * pair[1] + extra[1])


def macs_dict(request: tuple[int, int], prefill: tuple[int, int],
              prefill_matmul: bool = False) -> dict[str, int]:
    """`Method.macs`'s dict from (all, matmul-only) counts of a request and of prefill;
    `prefill_matmul` adds prefill's matmul count (the methods whose prefill is not a plain
    forward report it)."""
    out = {"request": request[0], "request_matmul": request[1], "prefill": prefill[0]}
    if prefill_matmul:
        out["prefill_matmul"] = prefill[1]
    return out
