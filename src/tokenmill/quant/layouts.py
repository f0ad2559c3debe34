"""Checkpoint layouts of integer weights <-> GroupedInts.

- AutoAWQ "gemm" (AWQ): `qweight` int32 [in, out/8] packs 8 output columns per word in
  the order [0, 2, 4, 6, 1, 3, 5, 7] (field k, bits 4k.., holds column 8j + ORDER[k]);
  `qzeros` int32 [groups, out/8] the same way; `scales` float16 [groups, out];
  w = (q - z) * s with group = input row // group_size.
- GPTQ (AutoGPTQ / GPTQModel): `qweight` int32 [in * bits / 32, out] packs consecutive
  INPUT rows (field k of word r is input row r * 32/bits + k); `qzeros` int32
  [groups, out * bits / 32] packs consecutive output columns; `scales` float16
  [groups, out]; `g_idx` int32 [in] the group of each input row (out of order with
  act-order, desc_act). w = s * (q - z). The classic "gptq" checkpoint format (v1) stores
  z - 1, written by GPTQModel as the packed word minus 0x11111111 (a borrow when z = 0);
  we undo it exactly as GPTQModel's v1 -> v2 conversion does (the packed word plus
  0x11111111, mod 2^32). "gptq_v2" stores z.
- tokenmill int8: `weight` int8 [out, in], `weight_scale` float16 [out]; w = scale * q.
"""

from __future__ import annotations

import torch

from tokenmill.quant.grouped import GroupedInts, contiguous_groups

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field k of a word holds column ORDER[k]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column p sits in field REVERSE[p]


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [...] -> [..., 32/bits] int16: field k is bits k*bits.. of each word."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    return ((unsigned[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.int16)


def _words(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., 32/bits] small non-negative ints -> int32 words [...] (inverse of _fields)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    packed = (fields.to(torch.int64) << shifts).sum(-1)  # [...] in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
               group_size: int) -> GroupedInts:
    """AutoAWQ gemm tensors -> GroupedInts. qzeros None (zero_point false): the codes are
    symmetric around 8 (uint4 with bias 8, vLLM's reading of such checkpoints)."""
    reverse = torch.tensor(AWQ_REVERSE_ORDER)
    codes = _fields(qweight, 4)[..., reverse].reshape(qweight.shape[0], -1)  # [in, out]
    num_groups, out = scales.shape
    if qzeros is None:
        zeros = torch.full((num_groups, out), 8, dtype=torch.int16)
    else:
        zeros = _fields(qzeros, 4)[..., reverse].reshape(num_groups, -1)  # [groups, out]
    return GroupedInts(codes.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(),
                       contiguous_groups(codes.shape[0], group_size))


def pack_awq(g: GroupedInts) -> dict[str, torch.Tensor]:
    """GroupedInts with 4-bit codes in contiguous groups -> {qweight, qzeros, scales} as AutoAWQ writes them."""
    order = torch.tensor(AWQ_ORDER)
    out, cols = g.shape
    codes = g.codes.t().reshape(cols, out // 8, 8)[..., order]  # [in, out/8, 8]: field k <- column ORDER[k]
    zeros = g.zeros.t().reshape(-1, out // 8, 8)[..., order]  # [groups, out/8, 8]
    return {"qweight": _words(codes, 4), "qzeros": _words(zeros, 4),
            "scales": g.scales.t().contiguous().to(torch.float16)}


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, v1_zeros: bool) -> GroupedInts:
    """GPTQ tensors -> GroupedInts (see the module docstring for the layout)."""
    per_word = 32 // bits
    codes = _fields(qweight, bits).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [in, out]
    if v1_zeros:  # v1 stored z - 1 per field: add 1 to every field, carries as GPTQModel does
        one_each = sum(1 << (bits * k) for k in range(per_word))
        qzeros = qzeros.to(torch.int64) + one_each  # _fields reads it mod 2^32
    zeros = _fields(qzeros, bits).reshape(qzeros.shape[0], -1)  # [groups, out]
    num_cols = codes.shape[0]
    group = g_idx.to(torch.int64) if g_idx is not None else contiguous_groups(num_cols, group_size)
    return GroupedInts(codes.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), group)


def unpack_int8(weight: torch.Tensor, weight_scale: torch.Tensor) -> GroupedInts:
    """tokenmill int8 (`weight` int8 [out, in], `weight_scale` [out]) -> GroupedInts."""
    out, cols = weight.shape
    return GroupedInts(weight.to(torch.int16), weight_scale.reshape(out, 1),
                       torch.zeros(out, 1, dtype=torch.int16), torch.zeros(cols, dtype=torch.int64))


def pack_int8(g: GroupedInts) -> dict[str, torch.Tensor]:
    return {"weight": g.codes.to(torch.int8), "weight_scale": g.scales.reshape(-1).to(torch.float16)}
