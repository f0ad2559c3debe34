"""Row-wise Triton kernels: (residual add +) RMSNorm, SiLU-and-mul, token bitmasks.

Each rounds to the storage dtype exactly where the PyTorch ops in model/layers do (the
same contract as the CPU kernels, csrc/kernels_impl.h), so the two agree to the dtype.
One program per row: a row (hidden size <= 16K) fits one block of registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out_ptr, x_ptr, res_ptr, w_ptr, dim, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(dtype)  # the residual stream is stored in the dtype
        tl.store(res_ptr + row * dim + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * inv).to(dtype).to(tl.float32)  # normalised in float32, rounded, then scaled
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (w * normed).to(dtype), mask=mask)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> None:
    """out = weight * norm(x) for x: [rows, dim] contiguous; with `residual`, first
    residual += x (in place) and normalise that."""
    rows, dim = x.shape
    if rows:
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(rows,)](out, x, x if residual is None else residual, weight, dim, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=block,
                                  num_warps=min(16, max(4, block // 256)))  # a wide row over more threads


@triton.jit
def _silu_and_mul_kernel(out_ptr, gate_up_ptr, dim, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < dim
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gate_up_ptr + row * 2 * dim + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * dim + dim + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # rounded like F.silu's output
    tl.store(out_ptr + row * dim + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(out: torch.Tensor, gate_up: torch.Tensor) -> None:
    """out [rows, dim] = silu(gate) * up for gate_up [rows, 2 * dim] (gate first)."""
    rows, dim = out.shape
    block = min(1024, triton.next_power_of_2(dim))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(dim, block))](out, gate_up, dim, BLOCK=block)


@triton.jit
def _token_bitmask_kernel(logits_ptr, bits_ptr, rows_ptr, vocab, words, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = tokens < vocab
    word = tl.load(bits_ptr + i * words + tokens // 32, mask=mask, other=-1)
    allowed = ((word >> (tokens % 32)) & 1) != 0
    tl.store(logits_ptr + row * vocab + tokens, float("-inf"), mask=mask & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [R, V] float32: -inf where row rows[i]'s mask bitmask[i] (int32 words, bit
    set = allowed) forbids the token."""
    num_masks, words = bitmask.shape
    vocab = logits.shape[1]
    if words * 32 < vocab:
        raise ValueError(f"apply_token_bitmask: a mask of {words} words cannot cover {vocab} tokens")
    bitmask = bitmask.to(logits.device, non_blocking=True)
    rows = rows.to(logits.device, non_blocking=True)
    block = 1024
    if num_masks:
        _token_bitmask_kernel[(num_masks, triton.cdiv(vocab, block))](logits, bitmask, rows, vocab, words, BLOCK=block)
