"""Attention over the paged KV cache for one flat batch of tokens.

Cache layout, per layer: ONE tensor [2 (K, V), num_kv_heads, num_blocks, block_size,
head_dim]. Heads outermost means that gathering a batch's blocks with one index op
yields [2, Hkv, B, L, D], where every (head, request) pair is a contiguous [L, D]
matrix: batched matmuls consume it with no further copy.

The runner orders a step's requests decodes first (one query token each), then
prefill chunks. Decodes run one kernel that reads each request's blocks in place (the
compiled CPU kernel, or Triton on a GPU: `kernels.for_tensor`); without kernels they share
one gather and two batched matmuls. Each prefill chunk attends causally to its cached
context plus its own tokens: on a GPU all chunks in one Triton launch over the paged cache
(`AttentionMetadata.paged_prefills`), else SDPA per chunk over its gathered blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.model import kernels


@dataclass
class PagedPrefills:
    """A step's prefill chunks as tensors for one kernel launch (the Triton path)."""

    query_starts: torch.Tensor  # [P] int32 first row of each chunk in the flat batch
    query_lens: torch.Tensor  # [P] int32 query tokens of each chunk
    context_lens: torch.Tensor  # [P] int32 tokens cached before each chunk
    block_tables: torch.Tensor  # [P, max_blocks] int32, padded with block 0
    max_query_len: int  # sizes the launch grid


@dataclass
class AttentionMetadata:
    """How this step's flat token batch maps onto requests and cache slots."""

    # [num_tokens] flat cache slot (block_id * block_size + offset) each new token's K/V goes to
    slot_mapping: torch.Tensor
    num_decodes: int  # the first num_decodes tokens are single-token decodes, one per request
    # Decodes: [num_decodes, max_blocks] int32 block tables (padded with block 0)
    decode_block_tables: torch.Tensor | None
    # Decodes: [num_decodes] int32 tokens each request attends to (cached + this one)
    decode_seq_lens: torch.Tensor | None
    # The batched-matmul path only: [1, num_decodes, max_blocks * block_size, 1] float, 0
    # where visible, -inf past the end. None: decodes run the compiled CPU kernel, which
    # reads exactly decode_seq_lens tokens per request (the runner decides, once).
    decode_mask: torch.Tensor | None
    # Prefill chunks, one entry each: (first token index in the batch, number of query
    # tokens, number of tokens already in the cache before this chunk, block ids tensor;
    # None when paged_prefills carries the tables)
    prefills: list[tuple[int, int, int, torch.Tensor | None]]
    # The same chunks for the Triton prefill kernel; set by the runner when it runs.
    paged_prefills: PagedPrefills | None = None


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_kv_heads, num_blocks, block_size, head_dim)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store this step's keys and values. k, v: [T, Hkv, D]."""
    two, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    slots = kv_cache.view(two, num_kv_heads, num_blocks * block_size, head_dim)
    slots[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    slots[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of every query token to its request's context.

    Args:
        q: [T, Hq, D] queries; k, v: [T, Hkv, D] this step's keys/values (already written
            to the cache by `write_kv`).
        kv_cache: [2, Hkv, num_blocks, block_size, D].
    Returns:
        [T, Hq, D].
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_kv_heads = k.shape[1]
    nd = meta.num_decodes
    if nd:
        if meta.decode_mask is None:
            kernels.for_tensor(q).paged_decode_attention(
                out[:nd], q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens, scale
            )
        else:
            out[:nd] = _decode_attention(q[:nd], kv_cache, meta, scale)
    if meta.paged_prefills is not None:
        p = meta.paged_prefills
        kernels.for_tensor(q).paged_prefill_attention(out, q, kv_cache, p.query_starts, p.query_lens,
                                                      p.context_lens, p.block_tables, p.max_query_len, scale)
        return out
    group = q.shape[1] // num_kv_heads
    for start, q_len, ctx_len, block_ids in meta.prefills:
        qp = q[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        if ctx_len == 0:
            # Fresh prompt: its own K/V are all there is; skip the cache read.
            kp = k[start : start + q_len].transpose(0, 1)  # [Hkv, q_len, D]
            vp = v[start : start + q_len].transpose(0, 1)
            mask, causal = None, True
        else:
            seq_len = ctx_len + q_len
            # [2, Hkv, n, block_size, D] -> [2, Hkv, seq_len, D]
            kvp = kv_cache[:, :, block_ids].flatten(2, 3)[:, :, :seq_len]
            kp, vp = kvp[0], kvp[1]
            # Query i sits at absolute position ctx_len + i and sees keys 0..ctx_len + i.
            qi = torch.arange(q_len, device=q.device)[:, None] + ctx_len
            mask, causal = torch.arange(seq_len, device=q.device)[None, :] <= qi, False
        if group > 1:
            # SDPA's enable_gqa falls back to the slow math kernel on CPU; repeating K/V
            # keeps the fused (flash) kernel: a 1,024-token prefill went 433 -> 887 tok/s.
            kp, vp = kp.repeat_interleave(group, dim=0), vp.repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(
            qp.unsqueeze(0), kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=mask, is_causal=causal, scale=scale
        )[0]
        out[start : start + q_len] = o.transpose(0, 1)
    return out


def decode_mask(seq_lens: torch.Tensor, max_blocks: int, block_size: int) -> torch.Tensor:
    """[1, B, max_blocks * block_size, 1] float additive mask for `_decode_attention`."""
    visible = torch.arange(max_blocks * block_size, device=seq_lens.device)[None, :] < seq_lens[:, None]
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=seq_lens.device).masked_fill_(~visible, float("-inf"))
    return mask[None, :, :, None]  # broadcast over KV heads and the group


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per request over its gathered blocks. q: [B, Hq, D] -> [B, Hq, D].

    Two batched matmuls instead of SDPA: with one query row and a padding mask the CPU
    SDPA kernels were 2.2-2.9x slower (`python scripts/microbench.py attention`). The query heads of a KV group
    are stacked as rows, so GQA needs no K/V repeat.
    """
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[1]
    group = num_heads // num_kv_heads
    # [2, Hkv, B, max_blocks, block_size, D] -> [2, Hkv * B, L, D], contiguous; L covers
    # whole blocks (the mask hides the tail), so no slice breaks the contiguity.
    kv = kv_cache[:, :, meta.decode_block_tables].flatten(3, 4).flatten(1, 2)
    k, v = kv[0], kv[1]
    seq_len = k.shape[1]
    # [B, Hkv, G, D] -> [Hkv * B, D, G]
    qg = q.view(num_reqs, num_kv_heads, group, head_dim).permute(1, 0, 3, 2).reshape(-1, head_dim, group)
    # Scores as K @ q^T; q @ K^T measured the same in the engine (scripts/microbench.py step).
    scores = torch.bmm(k, qg).float()  # [Hkv * B, L, G]
    scores = scores.view(num_kv_heads, num_reqs, seq_len, group).mul_(scale).add_(meta.decode_mask)
    probs = torch.softmax(scores, dim=2).to(q.dtype).view(-1, seq_len, group)
    o = torch.bmm(probs.transpose(1, 2), v)  # [Hkv * B, G, D]
    return o.view(num_kv_heads, num_reqs, group, head_dim).transpose(0, 1).reshape(num_reqs, num_heads, head_dim)
