"""GroupedInts -> a StoredWeight in a format the CPU kernels multiply in integers.

- zero points all 8 (symmetric 4-bit: GPTQ sym, AWQ without zero points) -> Q4_0,
  d = scale: exact (d * (q - 8) is the same product);
- other 4-bit codes -> Q4_1, d = scale, m = -zero * scale rounded to float16 (Q4_1 stores
  w = d * q + m): the one inexact step, |error| <= |zero * scale| * 2^-11 (half an ulp of
  float16; 2^-25 below float16's normal range), under 1% of a quantization step;
- 8-bit codes whose (q - zero) fit in int8 (tokenmill int8, symmetric GPTQ 8-bit) -> Q8_0,
  d = scale, exact.

Scales are rounded to float16 where the checkpoint stores them wider (float16 scales,
as AWQ, GPTQ and tokenmill write them, are kept exactly). A group of 64 or 128 repeats
its (d, m) in each of its 32-value blocks. GPTQ act-order groups (g_idx out of order) are
made contiguous by sorting the input columns by group; the StoredWeight carries that
column order (`input_perm`) and Linear gathers x into it. A matrix whose groups do not
fall on whole 32-value blocks returns None (the caller keeps it in float).
"""

from __future__ import annotations

import torch

from tokenmill.model.gguf.quant_types import Q4_0, Q4_1, Q8_0
from tokenmill.model.stored_weight import StoredWeight
from tokenmill.quant.grouped import GroupedInts

_BLOCK = 32


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """float16 [out, nb] -> its little-endian bytes [out, nb, 2]."""
    return x.contiguous().view(torch.uint8).view(*x.shape, 2)


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [out, nb, 32] -> [out, nb, 16]: value j in the low nibble of byte j, j + 16 in its high one."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def to_stored(g: GroupedInts, bits: int) -> StoredWeight | None:
    """The matrix as Q4_0 / Q4_1 / Q8_0 blocks (see the module docstring), or None where
    no such format holds it (groups not on 32-column blocks, or 8-bit codes beyond int8)."""
    out, cols = g.shape
    if cols % _BLOCK:
        return None
    codes, group, perm = g.codes, g.group, None
    if bool((group[1:] < group[:-1]).any()):  # act-order: sort columns by group
        perm = torch.argsort(group, stable=True)
        codes, group = codes[:, perm], group[perm]
    block_group = group.view(-1, _BLOCK)  # [nb, 32]
    if not bool((block_group == block_group[:, :1]).all()):
        return None
    nb = cols // _BLOCK
    first = block_group[:, 0]  # [nb] the group of each block
    scale = g.scales[:, first].float()  # [out, nb]
    zero = g.zeros[:, first].to(torch.int32)  # [out, nb]
    d = scale.to(torch.float16)
    if not bool(torch.isfinite(d).all()):
        return None
    q = codes.view(out, nb, _BLOCK).to(torch.int32)
    if bits == 4:
        if bool((zero == 8).all()):
            ggml_type, body = Q4_0, [_half_bytes(d), _nibble_bytes(q)]
        else:
            m = (-(zero.float() * d.float())).to(torch.float16)  # exact product, one rounding
            ggml_type, body = Q4_1, [_half_bytes(d), _half_bytes(m), _nibble_bytes(q)]
    elif bits == 8:
        centred = q - zero[..., None]
        if int(centred.min()) < -128 or int(centred.max()) > 127:
            return None
        ggml_type, body = Q8_0, [_half_bytes(d), centred.to(torch.int8).view(torch.uint8)]
    else:
        return None
    blocks = torch.cat(body, dim=-1).reshape(out, -1)  # [out, nb * block_bytes]
    return StoredWeight(ggml_type, blocks, cols, perm)
