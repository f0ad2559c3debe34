"""Prefill attention over the paged KV cache in Triton: every prefill chunk of a step in one
launch, reading its cached prefix and its own keys in place through its block table.

The runner writes a chunk's K/V into the cache before attention (rotary_cache.py), so
cached prefix tokens (prefix-cache hits, earlier chunks) and new tokens are read the same
way, with no gather: query i of a chunk with `context_len` cached tokens sees keys
0..context_len + i (causal). A flash-attention forward: program (query tile, chunk,
query head) runs an online softmax over key tiles, products on tensor cores in the
cache's dtype with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.model.gpu_kernels import interpreted


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, cache_ptr, tables_ptr, q_starts_ptr, q_lens_ptr, ctx_lens_ptr,
    scale, q_stride, out_stride, max_blocks, block_size, head_stride, v_offset,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, FLOAT32_DOTS: tl.constexpr,
):
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + chunk)
    q_start = tl.load(q_starts_ptr + chunk).to(tl.int64)
    ctx_len = tl.load(ctx_lens_ptr + chunk)
    kv_head = head // GROUP

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    imask = i < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + i)[:, None] * q_stride + head * HEAD_DIM + d[None, :],
                mask=imask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head.to(tl.int64) * head_stride
    table = tables_ptr + chunk * max_blocks
    # Keys up to the tile's last query: the causal mask cuts the rest. A tile past a short
    # chunk's end (the grid fits the longest) reads nothing and stores nothing.
    num_keys = tl.where(tile * BLOCK_M < q_len, ctx_len + tl.minimum((tile + 1) * BLOCK_M, q_len), 0)
    for n0 in range(0, num_keys, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < num_keys
        block = tl.load(table + n // block_size, mask=nmask, other=0).to(tl.int64)
        slot = block * block_size + n % block_size
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + slot[:, None] * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if FLOAT32_DOTS:  # full-precision products (tf32 would lose float32 parity)
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] float32
        scores = scores * scale
        visible = (n[None, :] <= ctx_len + i[:, None]) & nmask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded query rows see nothing
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(k_base + v_offset + slot[:, None] * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0)
        if FLOAT32_DOTS:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    o = acc / tl.where(s_sum == 0.0, 1.0, s_sum)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * out_stride + head * HEAD_DIM + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=imask[:, None] & dmask[None, :])


def paged_prefill_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, query_starts: torch.Tensor,
                            query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float) -> None:
    """Causal attention of every prefill chunk to its cached context and itself.

    Args:
        out: [T, Hq, D]; rows of the chunks are written. q: [T, Hq, D] (heads contiguous).
        kv_cache: [2, Hkv, num_blocks, block_size, D], the chunks' K/V already written.
        query_starts, query_lens, context_lens: [P] int32 per chunk: its first row in q,
            its number of query tokens, its tokens already cached before it.
        block_tables: [P, max_blocks] int32.
        max_query_len: the longest chunk (host int: sizes the grid).
    """
    num_chunks = query_starts.shape[0]
    _, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
    if num_chunks == 0:
        return
    head_stride = num_blocks * block_size * head_dim
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Float32 caches keep float32 products. So does bfloat16 in Triton's interpreter (tests on
    # a CPU), whose dot multiplies bfloat16's raw bits.
    float32_dots = kv_cache.dtype == torch.float32 or (interpreted() and kv_cache.dtype == torch.bfloat16)
    block_m = 32 if float32_dots else 64
    block_n = 32
    grid = (triton.cdiv(max_query_len, block_m), num_chunks, num_heads)
    _prefill_kernel[grid](
        out, q, kv_cache, block_tables, query_starts, query_lens, context_lens,
        scale, q.stride(0), out.stride(0), block_tables.shape[1], block_size, head_stride,
        num_kv_heads * head_stride,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, FLOAT32_DOTS=float32_dots,
    )
