"""Linear layer: a float weight (repacked once for oneDNN on CPU), or stored weights read
in place by the CPU kernels."""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model import kernels
from tokenmill.model.stored_weight import StoredWeight


class Linear(nn.Module):
    """y = x W^T + b over [T, in_features] inputs.

    `pack_for_cpu()` reorders the weight into oneDNN's blocked layout: the GEMM then
    skips its per-call weight reformatting: one layer's linears measured 1.25-1.33x
    faster at 64 rows and 2.2-2.4x at 1 row (`python scripts/microbench.py linear`).

    Or the weight stays in its file's storage format (`set_stored`): quantized blocks or
    16-bit floats, one part per checkpoint tensor of a fused projection (q, k and v may
    differ in format), each multiplied by the CPU kernels into its rows of the output. A
    part stored with its input columns reordered (`StoredWeight.input_perm`: a GPTQ
    act-order checkpoint) gets x gathered into that order. Each part is one kernel call
    (`StoredWeight.matmul`), which quantizes x itself where the format multiplies in
    integers (less work than the Python dispatch that sharing it across parts took).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        self.stored: list[tuple[int, StoredWeight]] = []  # (first output row, its weight)

    def set_stored(self, first_row: int, weight: StoredWeight) -> None:
        """Keep rows first_row.. of the weight as `weight` (the float weight goes at finalize)."""
        self.stored.append((first_row, weight))

    def finalize_for_cpu(self) -> None:
        """After loading: with stored parts, rows no part covers (a float32 tensor fused with
        quantized ones) become float32 stored parts and the float weight is dropped; else
        the weight is repacked for oneDNN where it can be."""
        if not self.stored:
            if _unpackable_16_bit(self.weight):
                self.stored = [(0, _sixteen_bit_part(self.weight).interleave_rows())]
                self.weight = None  # type: ignore[assignment]
            else:
                self.pack_for_cpu()
            return
        self.stored.sort(key=lambda part: part[0])
        parts, row = [], 0
        perms: list[torch.Tensor] = []
        for first_row, weight in self.stored:
            if weight.input_perm is not None:  # parts with equal orders share one tensor: one gather per call
                same = next((p for p in perms if torch.equal(p, weight.input_perm)), None)
                if same is None:
                    perms.append(weight.input_perm)
                else:
                    weight = dataclasses.replace(weight, input_perm=same)
            if first_row > row:
                parts.append((row, _float32_part(self.weight[row:first_row])))
            parts.append((first_row, weight))
            row = first_row + weight.shape[0]
        if row < self.out_features:
            parts.append((row, _float32_part(self.weight[row:])))
        self.stored = [(first_row, weight.interleave_rows()) for first_row, weight in _merge_adjacent(parts)]
        self.weight = None  # type: ignore[assignment]

    @staticmethod
    def can_pack(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and onednn_packs(weight.dtype)

    def pack_for_cpu(self) -> None:
        """Replace the plain weight by a oneDNN-packed copy (the plain one is released)."""
        if self._packed is None and self.can_pack(self.weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self.weight = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stored:
            xf = x.float().contiguous()  # [T, in]
            if len(self.stored) == 1:  # most layers: no slicing, one kernel call
                out = self.stored[0][1].matmul(xf)
            else:
                out = xf.new_empty(xf.shape[0], self.out_features)  # [T, out] float32
                for first_row, weight in self.stored:
                    weight.matmul(xf, out[:, first_row : first_row + weight.shape[0]])
            out = out.to(x.dtype)
            return out if self.bias is None else out.add_(self.bias)
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can repack weights of `dtype` on this CPU. It packs float32 on any
    x86-64 CPU; bfloat16 and float16 only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, and
    says so by raising. Trying once on a tiny weight is the one test that cannot drift from
    oneDNN's own rules; elsewhere the plain F.linear path runs."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


def _merge_adjacent(parts: list[tuple[int, StoredWeight]]) -> list[tuple[int, StoredWeight]]:
    """Adjacent parts of one format and column order as one StoredWeight (q, k and v of most
    files): one kernel call per projection instead of one per part. At one token a call
    costs about as much in dispatch and thread wake-up as in arithmetic. The rows are copied
    out of the file's mapping into one tensor (the same bytes, now private memory)."""
    merged: list[tuple[int, StoredWeight]] = []
    for first_row, weight in parts:
        if merged:
            prev_row, prev = merged[-1]
            same_order = prev.input_perm is weight.input_perm  # equal orders share one tensor (above)
            if (prev.ggml_type, prev.cols) == (weight.ggml_type, weight.cols) and same_order:
                blocks = torch.cat([prev.blocks, weight.blocks])
                merged[-1] = (prev_row, dataclasses.replace(prev, blocks=blocks))
                continue
        merged.append((first_row, weight))
    return merged


# ggml's type ids of the 16-bit floats, as StoredWeight.ggml_type.
_GGML_16_BIT = {torch.float16: 1, torch.bfloat16: 30}


def _unpackable_16_bit(weight: torch.Tensor) -> bool:
    """A 16-bit weight oneDNN cannot pack (CPUs without AVX-512 or AVX-NE-CONVERT) goes to the
    kernels, which widen it to float32 in registers (rows interleaved by 8); F.linear
    emulates the 16-bit matmul, several times slower for batches (docs/performance.md,
    "Which dtype auto picks")."""
    return (weight.device.type == "cpu" and weight.dtype in _GGML_16_BIT and weight.shape[1] % 32 == 0
            and not onednn_packs(weight.dtype) and kernels.cpu_kernels() is not None)


def _sixteen_bit_part(weight: torch.Tensor) -> StoredWeight:
    """A 16-bit weight as a stored part: its own bytes, [rows, 2 * cols] uint8."""
    weight = weight.detach().contiguous()
    return StoredWeight(_GGML_16_BIT[weight.dtype], weight.view(torch.uint8), weight.shape[1])


def _float32_part(rows: torch.Tensor) -> StoredWeight:
    """Float rows as a stored float32 part (ggml type 0): [rows, cols] -> bytes."""
    rows = rows.detach().float().contiguous()
    return StoredWeight(0, rows.view(torch.uint8), rows.shape[1])
