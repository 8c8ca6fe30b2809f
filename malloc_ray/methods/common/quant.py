"""The shared quantizer of the precision methods (kivi.py, intactkv.py; no method of its own):
asymmetric min-max, packed.

A tensor is cut into contiguous groups of `group` elements along one axis (the last group may
be shorter); each group gets its own zero point (the min) and scale ((max - min) / (2^b - 1)):

    code = round((x - min) / scale)  in [0, 2^b - 1],     x_hat = code * scale + min

so |x - x_hat| <= scale / 2 per element (up to fp32 rounding). Codes are packed along the LAST
axis into uint8, 8 / b codes per byte, so a 2-bit memory is 1/16 of fp32 (plus scales).
b = 16 means "no quantization": the values stay fp32 (the LLM papers' 16-bit baseline is fp16;
ours is fp32), so a 16-bit cache is exactly the full cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BITS = (2, 4, 8, 16)
FULL = 16  # "bits" value that keeps fp32


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} (16 keeps fp32), got {bits!r}")


def packed_width(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take along the packed axis (ceil(n * b / 8))."""
    per = 8 // bits
    return -(-n // per)


def _per_element(t: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """Per-group values (..., ceil(n/group)) -> per-element (..., n) along the last axis."""
    return t.repeat_interleave(group, dim=-1)[..., :n]


def quantize(x: torch.Tensor, bits: int, group: int, dim: int = -1):
    """Min-max codes of x over groups along `dim` -> (codes uint8 like x, scale, zero).

    scale and zero have x's shape with `dim` shrunk to ceil(size / group).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"quantize takes 2, 4 or 8 bits, got {bits!r}")
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    groups = -(-n // group)
    pad = groups * group - n  # a short last group: pad so padding never wins min or max
    lo = F.pad(x, (0, pad), value=float("inf")).unflatten(-1, (groups, group)).amin(-1)
    hi = F.pad(x, (0, pad), value=float("-inf")).unflatten(-1, (groups, group)).amax(-1)
    top = 2**bits - 1
    scale = (hi - lo) / top
    # A constant group has scale 0: code 0 and x_hat = min = x exactly (no division by zero).
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - _per_element(lo, group, n)) / _per_element(safe, group, n))
    codes = codes.clamp(0, top).to(torch.uint8)
    return codes.movedim(-1, dim), scale.movedim(-1, dim), lo.movedim(-1, dim)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
               dim: int = -1) -> torch.Tensor:
    codes = codes.movedim(dim, -1)
    n = codes.shape[-1]
    scale, zero = scale.movedim(dim, -1), zero.movedim(dim, -1)
    x = codes.to(scale.dtype) * _per_element(scale, group, n) + _per_element(zero, group, n)
    return x.movedim(-1, dim)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes (uint8, values < 2^b) -> uint8 holding 8/b codes each, along the last axis.

    Code j of a byte sits at bits [j*b, (j+1)*b); a short last byte is zero-filled.
    """
    per = 8 // bits
    n = codes.shape[-1]
    width = packed_width(n, bits)
    c = F.pad(codes.to(torch.int32), (0, width * per - n)).unflatten(-1, (width, per))
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)  # fields do not overlap: sum == bitwise or


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first n codes along the last axis, uint8."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return c.flatten(-2)[..., :n].to(torch.uint8)


def encode(x: torch.Tensor, bits: int, group: int, dim: int = -1) -> dict[str, torch.Tensor]:
    """What a quantized memory stores: packed `codes` plus `scale` and `zero` (b < 16), or
    the fp32 values themselves as `codes` (b = 16)."""
    check_bits(bits)
    if bits == FULL:
        return {"codes": x}
    codes, scale, zero = quantize(x, bits, group, dim)
    return {"codes": pack(codes, bits), "scale": scale, "zero": zero}


def decode(enc: dict[str, torch.Tensor], bits: int, group: int, dim: int, n: int) -> torch.Tensor:
    """Inverse of `encode`; n is the length of the last (packed) axis before packing."""
    if bits == FULL:
        return enc["codes"]
    return dequantize(unpack(enc["codes"], bits, n), enc["scale"], enc["zero"], group, dim)
