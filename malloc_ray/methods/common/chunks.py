"""Sequence helpers of the recompute methods that attend in chunks (longformer, reformer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_rows(pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the valid tokens at each user's last position (the target or candidates).

    In training that is i_S; in a request, every candidate (they share the position).
    """
    last = pos.masked_fill(~valid, torch.iinfo(pos.dtype).min).amax(1, keepdim=True)
    return valid & (pos == last)


def previous_chunks(x: torch.Tensor, m: int, dim: int, fill) -> torch.Tensor:
    """x (..., chunks, c, ...) with chunks on `dim` -> (..., chunks, (m+1) c, ...): for chunk g,
    the tokens of chunks g-m .. g in order, i.e. the keys a query of chunk g may reach.

    Chunks before the first are filled with `fill` (the caller masks them).
    """
    pad = [0, 0] * (x.dim() - dim - 1) + [m, 0]
    padded = F.pad(x, pad, value=fill)
    n = x.shape[dim]
    return torch.cat([padded.narrow(dim, j, n) for j in range(m + 1)], dim + 1)
