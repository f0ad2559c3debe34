"""Paged decode attention in Triton: one query token per row, reading the block tables in
place, every query head of a KV group in one program (GQA loads K/V once), split-K over
long contexts.

Stage 1: program (row, KV head, split) runs an online softmax over its split's tokens and
writes a partial output with its log-sum-exp. Stage 2 merges the splits. With one split the
first stage writes the output directly (one launch). Splits let a small batch with long
contexts fill the GPU; their count is fixed by the shapes alone (no host sync, and the same
for every step a CUDA graph replays).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A split covers at least this many tokens: below it the merge costs more than it spreads.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    out_ptr, mid_out_ptr, mid_lse_ptr, q_ptr, cache_ptr, tables_ptr, seq_lens_ptr,
    scale, q_stride, max_blocks, block_size, head_stride, v_offset, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    # Splits are whole BLOCK_N chunks; the last ones may be empty for a short row.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    h = tl.arange(0, BLOCK_H)
    hmask = h < GROUP
    heads = kv_head * GROUP + h
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + row * q_stride + heads[:, None] * HEAD_DIM + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale  # [BLOCK_H, BLOCK_D]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head.to(tl.int64) * head_stride
    table = tables_ptr + row * max_blocks
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(table + n // block_size, mask=nmask, other=0).to(tl.int64)
        slot = block * block_size + n % block_size  # [BLOCK_N]
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + slot[:, None] * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        # [BLOCK_H, 1, D] * [1, BLOCK_N, D] summed over D: exact float32, no tensor-core
        # shape rules for a group of 1-8 heads (decode is bound by reading K/V anyway).
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_H, BLOCK_N]
        scores = tl.where(nmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(k_base + v_offset + slot[:, None] * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    out_mask = hmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        o = acc / s_sum[:, None]
        tl.store(out_ptr + row * num_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # [rows, Hq, NUM_SPLITS, D] and [rows, Hq, NUM_SPLITS]; an empty split has lse -inf.
        empty = end <= start
        o = tl.where(empty, 0.0, acc / tl.where(empty, 1.0, s_sum)[:, None])
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, s_sum)))
        mid = (row * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(mid_out_ptr + mid[:, None] * HEAD_DIM + d[None, :], o, mask=out_mask)
        tl.store(mid_lse_ptr + mid, lse, mask=hmask)


@triton.jit
def _decode_merge_kernel(out_ptr, mid_out_ptr, mid_lse_ptr, num_heads,
                         HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    smask = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    mid = (row * num_heads + head) * NUM_SPLITS + s
    lse = tl.load(mid_lse_ptr + mid, mask=smask, other=float("-inf"))  # [BLOCK_S]
    weight = tl.exp(lse - tl.max(lse, axis=0))  # the first split is never empty: max is finite
    parts = tl.load(mid_out_ptr + mid[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    o = tl.sum(parts * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + (row * num_heads + head) * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


def num_splits_for(num_rows: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per (row, KV head): enough programs for two waves over the GPU's SMs, none
    shorter than MIN_TOKENS_PER_SPLIT tokens. Rows count as the CUDA-graph batch bucket
    they fall in (1, 2, 4, multiples of 8): a step splits alike replayed or eager, so both
    sum in the same order, and few split counts means few compiled variants."""
    rows = num_rows if num_rows <= 4 else triton.cdiv(num_rows, 8) * 8
    want = triton.cdiv(2 * num_sms, max(1, rows * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def paged_decode_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int) -> None:
    """Attention of one query token per row to its request's cached tokens.

    Args:
        out: [rows, Hq, D] written; q: [rows, Hq, D] (rows may be strided, heads contiguous).
        kv_cache: [2, Hkv, num_blocks, block_size, D].
        block_tables: [rows, max_blocks] int32; seq_lens: [rows] int32 (>= 1).
        num_splits: split-K factor (`num_splits_for`).
    """
    num_rows, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
    if num_rows == 0:
        return
    group = num_heads // num_kv_heads
    head_stride = num_blocks * block_size * head_dim
    block_s = triton.next_power_of_2(num_splits)
    if num_splits > 1:
        mid_out = torch.empty((num_rows, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_rows, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        mid_out = mid_lse = out  # unused
    block_d = triton.next_power_of_2(head_dim)
    # Keep the [BLOCK_H, BLOCK_N, BLOCK_D] products in registers: 16 tokens at a time for
    # up to 8 heads of 128.
    block_h = max(triton.next_power_of_2(group), 1)
    block_n = max(16, min(64, 8192 // (block_h * block_d)))
    _decode_split_kernel[(num_rows, num_kv_heads, num_splits)](
        out, mid_out, mid_lse, q, kv_cache, block_tables, seq_lens,
        scale, q.stride(0), block_tables.shape[1], block_size, head_stride, num_kv_heads * head_stride, num_heads,
        GROUP=group, HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_rows, num_heads)](out, mid_out, mid_lse, num_heads,
                                                    HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                                                    BLOCK_S=block_s, BLOCK_D=block_d)
