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

import dataclasses
from dataclasses import dataclass

import torch

from tokenmill.model import kernels


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
    # Rows interleaved in groups of 8 (`interleave_rows`).
    rows8: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.cols)

    def permute_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] in the model's feature order -> the stored column order."""
        return x if self.input_perm is None else x.index_select(1, self.input_perm)

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, cols] float32 in the model's feature order -> x @ W^T [T, rows] float32,
        into `out` when given (it may be a column slice of a wider output)."""
        x = self.permute_input(x)
        if out is None:
            out = x.new_empty(x.shape[0], self.shape[0])
        kernels.cpu_kernels().stored_matmul(out, x, self.blocks, self.ggml_type, self.rows8)
        return out

    def interleave_rows(self) -> StoredWeight:
        """This weight with its rows interleaved in groups of 8 where the kernels have that
        layout (Q4_0, Q4_1, Q8_0, F16, BF16 with a multiple of 8 rows; else itself): the same bytes,
        reordered so that one integer product serves 8 rows (kernels/csrc/quant_matmul.h,
        Rows8); SmolLM2's Q4_1 projections multiply 2-2.8x faster at 1-64 tokens. A
        private copy of the file's bytes."""
        ops = kernels.cpu_kernels()
        if self.rows8 or not ops.can_repack_rows8(self.ggml_type, self.shape[0]):
            return self
        return dataclasses.replace(self, blocks=ops.repack_rows8(self.blocks, self.ggml_type), rows8=True)

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 values of the given rows [len(rows), cols], in the model's feature order."""
        out = torch.empty(rows.numel(), self.cols)
        kernels.cpu_kernels().decode_rows(out, self.blocks, rows.reshape(-1).to(torch.long), self.ggml_type, self.rows8)
        if self.input_perm is not None:
            out = torch.empty_like(out).index_copy_(1, self.input_perm, out)
        return out.view(*rows.shape, self.cols)
