"""What a trial asks Ray Tune for: CPUs, and on CUDA machines a GPU fraction from a memory estimate.

The fraction is the trial's estimated peak memory over the device's memory, rounded up to a
multiple of 1/8, and the trial enforces it on itself with
`torch.cuda.set_per_process_memory_fraction`, so packed trials cannot starve each other.
"""

from __future__ import annotations

import math
from fractions import Fraction

from malloc_ray.config import TrialConfig

FLOAT = 4
# Tensors the attention keeps for backward per (query, key) pair and head: scores, SiLU output,
# masked weights, the mask and the bias gather; per token and width: about a dozen activations.
PAIR_TENSORS, TOKEN_TENSORS = 6, 14
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + allocator slack per process


def estimate_peak_bytes(cfg: TrialConfig, vocab_size: int) -> int:
    """Training peak of one trial: weights + grads + Adam moments, activations, one KV cache."""
    d, heads, layers = cfg.d_model, cfg.num_heads, cfg.depth
    params = vocab_size * d + 2 * d + layers * (5 * d * d + 8 * d + 32 * heads) + 2 * d
    n = 2 * cfg.max_len  # interleaved tokens per window
    per_layer = cfg.batch_size * (PAIR_TENSORS * heads * n * n + TOKEN_TENSORS * n * d)
    eval_kv = cfg.eval_batch_size * layers * n * 2 * d
    return FLOAT * (4 * params + layers * per_layer + eval_kv) + CUDA_CONTEXT_BYTES


def gpu_fraction(estimated_bytes: float, device_bytes: float, step: float = 0.125) -> float:
    """Share of one GPU: estimated peak over device memory, rounded up to a multiple of
    `step`, at least one step and at most one device."""
    if device_bytes <= 0:
        raise ValueError("device memory must be positive")
    # Exact rationals: a float ratio would round 10 GiB + 1 byte of 80 GiB down to 1/8.
    steps = math.ceil(Fraction(estimated_bytes) / (Fraction(device_bytes) * Fraction(step)))
    return min(1.0, max(1, steps) * step)


def trial_resources(cfg: TrialConfig, vocab_size: int, cpus: float, gpus: str | float,
                    device_bytes: int | None, step: float = 0.125) -> dict:
    """The resource dict for `tune.with_resources`, and the fraction the trial enforces."""
    if cfg.device != "cuda" or device_bytes is None or gpus == 0:
        return {"cpu": cpus, "gpu": 0}
    if gpus == "auto":
        fraction = gpu_fraction(estimate_peak_bytes(cfg, vocab_size), device_bytes, step)
    else:
        fraction = float(gpus)
    return {"cpu": cpus, "gpu": fraction}
