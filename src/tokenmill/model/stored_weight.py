"""Weights kept in the storage format of their file (ggml blocks or 16-bit floats).

A quantized GGUF model runs without being dequantized: its matrices stay as the file's
bytes (memory-mapped: resident memory is about the file size) and the CPU kernels read
them block by block inside the matrix products. Q4_0, Q4_1, Q8_0, Q4_K and Q6_K blocks
are multiplied in integers against activations quantized to int8 per 32 values, as
llama.cpp does (kernels/csrc/quant_matmul.h; 2-5x faster than decoding them to float, and
than float32 weights, at 1-16 tokens: `python scripts/microbench.py quant`); the other
formats are decoded to float32 inside the product (weight_formats.h). Layers hold
`StoredWeight`s instead of float parameters where the loader chose to keep them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tokenmill.model import kernels


@functools.cache
def int8_activation_types() -> frozenset[int]:
    """ggml types multiplied in integers against int8 activations (the kernels' table:
    Q4_0, Q4_1, Q8_0, Q4_K, Q6_K); the others are decoded to float32 in the product."""
    return frozenset(row[0] for row in kernels.cpu_kernels().weight_formats() if row[3])


QuantizedActivations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # int8 [T, K], scales, sums [T, K/32]


def quantize_activations(x: torch.Tensor) -> QuantizedActivations:
    """x [T, K] float32 -> int8 per 32-value block with its scale and sum (llama.cpp's Q8_1)."""
    return kernels.cpu_kernels().quantize_activations(x)


@dataclass(frozen=True)
class StoredWeight:
    """A [rows, cols] matrix as stored bytes: `blocks` [rows, row_bytes] uint8."""

    ggml_type: int  # the storage format, by ggml's type id (0 F32, 1 F16, 8 Q8_0, 30 BF16, ...)
    blocks: torch.Tensor
    cols: int
    # Stored column k multiplies input feature input_perm[k] ([cols] int64), or None for the
    # natural order. GPTQ act-order checkpoints group input columns out of order; sorting
    # them by group lets each 32-value block keep one scale (tokenmill.quant.ggml_blocks).
    input_perm: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.cols)

    @property
    def uses_int8_activations(self) -> bool:
        return self.ggml_type in int8_activation_types()

    def permute_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] in the model's feature order -> the stored column order."""
        return x if self.input_perm is None else x.index_select(1, self.input_perm)

    def matmul(self, x: torch.Tensor, out: torch.Tensor, x_int8: QuantizedActivations | None = None) -> None:
        """out [T, rows] float32 (may be a column slice of a wider output) = x [T, cols] @ W^T.

        Args:
            x: float32 activations in the stored column order (`permute_input`).
            out: where the product goes.
            x_int8: x quantized per 32-value block (`quantize_activations(x)`), for the
                formats multiplied in integers (uses_int8_activations); shared by every
                part of a fused projection.
        """
        ops = kernels.cpu_kernels()
        if self.uses_int8_activations:
            xq, xd, xs = x_int8 if x_int8 is not None else quantize_activations(x)
            ops.quant_matmul(out, xq, xd, xs, self.blocks, self.ggml_type)
        else:
            ops.weight_matmul(out, x, self.blocks, self.ggml_type)

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 values of the given rows [len(rows), cols], in the model's feature order."""
        out = torch.empty(rows.numel(), self.cols)
        kernels.cpu_kernels().decode_rows(out, self.blocks, rows.reshape(-1).to(torch.long), self.ggml_type)
        if self.input_perm is not None:
            out = torch.empty_like(out).index_copy_(1, self.input_perm, out)
        return out.view(*rows.shape, self.cols)
