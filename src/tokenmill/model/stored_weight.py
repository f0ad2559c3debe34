"""Weights kept in the storage format of their file (ggml blocks or 16-bit floats).

A quantized GGUF model runs without being dequantized: its matrices stay as the file's
bytes (memory-mapped: resident memory is about the file size) and the CPU kernels decode
them block by block inside the matrix products (kernels/csrc/weight_formats.h). Layers
hold `StoredWeight`s instead of float parameters where the loader chose to keep them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model import kernels


@dataclass(frozen=True)
class StoredWeight:
    """A [rows, cols] matrix as stored bytes: `blocks` [rows, row_bytes] uint8."""

    ggml_type: int  # the storage format, by ggml's type id (0 F32, 1 F16, 8 Q8_0, 30 BF16, ...)
    blocks: torch.Tensor
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.cols)

    def select_rows(self, rows: slice | torch.Tensor) -> StoredWeight:
        """Some of its rows (a view for a slice; a permutation copies)."""
        return StoredWeight(self.ggml_type, self.blocks[rows], self.cols)

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, cols] float32 @ W^T -> [T, rows] float32, into `out` if given (may be a
        column slice of a wider output)."""
        if out is None:
            out = x.new_empty(x.shape[0], self.blocks.shape[0])
        kernels.cpu_kernels().weight_matmul(out, x, self.blocks, self.ggml_type)
        return out

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 values of the given rows [len(rows), cols]."""
        out = torch.empty(rows.numel(), self.cols)
        kernels.cpu_kernels().decode_rows(out, self.blocks, rows.reshape(-1).to(torch.long), self.ggml_type)
        return out.view(*rows.shape, self.cols)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix as float32 (tests, and layers without the kernels)."""
        return self.decode_rows(torch.arange(self.blocks.shape[0]))
