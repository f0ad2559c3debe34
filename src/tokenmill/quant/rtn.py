"""Round-to-nearest quantizers: int8 per output channel (symmetric) and int4 per group of
input columns (asymmetric, codes 0..15 with a zero point).

Scales are chosen in float16 (the checkpoint stores them so) and rounded UP to the next
float16, so no weight falls outside the code range: every weight is within half a step
(scale / 2) of its dequantized value. The int4 range always includes 0 (as GPTQ's
quantizer; AutoAWQ's does not, and clips a group of all-positive weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.grouped import GroupedInts, contiguous_groups

# The smallest positive float16 (a subnormal): the scale of an all-zero row or group.
_MIN_HALF = 2.0**-24


def half_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (x float32, positive). Raises ValueError past float16's range."""
    x = x.clamp(min=_MIN_HALF)
    h = x.to(torch.float16)
    low = h.float() < x
    h = torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)  # next float16 up
    if not bool(torch.isfinite(h).all()):
        raise ValueError("a weight scale exceeds float16's range (65504); these weights cannot be stored as int.")
    return h


def _int8_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float32 -> (codes [out, in] float32 in -127..127, scale [out] float16)."""
    scale = half_at_least(w.abs().amax(dim=1) / 127)
    return torch.round(w / scale.float()[:, None]).clamp_(-127, 127), scale


def _int4_parts(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] float32 -> (codes [out, groups, group_size] float32 in 0..15 (the last
    group zero-padded), zero [out, groups] float32, scale [out, groups] float16)."""
    out, cols = w.shape
    num_groups = -(-cols // group_size)
    # Zero padding fills the last group without changing its range (which includes 0).
    wg = F.pad(w, (0, num_groups * group_size - cols)).view(out, num_groups, group_size)
    lo, hi = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)  # [out, groups]
    scale = half_at_least((hi - lo) / 15)
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, 15)
    codes = (torch.round(wg / s[..., None]) + zero[..., None]).clamp_(0, 15)
    return codes, zero, scale


def quantize_int8(w: torch.Tensor) -> GroupedInts:
    """w [out, in] -> int8 codes in -127..127 with one float16 scale per output row."""
    codes, scale = _int8_parts(w.float())
    out, cols = w.shape
    return GroupedInts(codes.to(torch.int16), scale[:, None], torch.zeros(out, 1, dtype=torch.int16),
                       torch.zeros(cols, dtype=torch.int64))


def quantize_int4(w: torch.Tensor, group_size: int) -> GroupedInts:
    """w [out, in] -> 4-bit codes with a float16 scale and an integer zero point per
    (row, group of `group_size` input columns; the last group may be shorter)."""
    out, cols = w.shape
    codes, zero, scale = _int4_parts(w.float(), group_size)
    return GroupedInts(codes.view(out, -1)[:, :cols].to(torch.int16), scale, zero.to(torch.int16),
                       contiguous_groups(cols, group_size))


def quantize(w: torch.Tensor, method: str, group_size: int) -> GroupedInts:
    """The quantizer of `tokenmill quantize --method` ("int8" or "int4")."""
    return quantize_int8(w) if method == "int8" else quantize_int4(w, group_size)


def fake_quantize(w: torch.Tensor, method: str, group_size: int) -> torch.Tensor:
    """w [out, in] -> float32 values after `quantize` and dequantization (equal to
    `quantize(...).dequantize()`, without the integer tensors: the AWQ search calls it often)."""
    w = w.float()
    if method == "int8":
        codes, scale = _int8_parts(w)
        return codes * scale.float()[:, None]
    out, cols = w.shape
    codes, zero, scale = _int4_parts(w, group_size)
    return ((codes - zero[..., None]) * scale.float()[..., None]).view(out, -1)[:, :cols]
