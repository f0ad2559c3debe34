"""Attention over the paged KV cache for one flat batch of tokens.

The runner orders a step's requests decodes first (one query token each), then
prefill chunks. Decodes are batched in one SDPA call over their gathered blocks;
each prefill chunk attends causally to its cached context plus its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """How this step's flat token batch maps onto requests and cache slots."""

    # [num_tokens] flat cache slot (block_id * block_size + offset) each new token's K/V goes to
    slot_mapping: torch.Tensor
    block_size: int
    num_decodes: int  # the first num_decodes tokens are single-token decodes, one per request
    # Decodes: [num_decodes, max_blocks] block tables (padded with 0) and [num_decodes] context lengths
    decode_block_tables: torch.Tensor | None
    decode_seq_lens: torch.Tensor | None
    decode_max_seq_len: int
    # Prefill chunks, one entry each: (first token index in the batch, number of query
    # tokens, number of tokens already in the cache before this chunk, block ids tensor)
    prefills: list[tuple[int, int, int, torch.Tensor]]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Store this step's K/V. Caches: [num_blocks, block_size, Hkv, D]; k, v: [T, Hkv, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query token to its request's context.

    Args:
        q: [T, Hq, D] queries; k, v: [T, Hkv, D] this step's keys/values (already written
            to the cache by `write_kv`).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D].
    Returns:
        [T, Hq, D].
    """
    out = torch.empty_like(q)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    gqa = q.shape[1] != num_kv_heads
    nd = meta.num_decodes
    if nd:
        tables = meta.decode_block_tables  # [B, max_blocks]
        max_len = meta.decode_max_seq_len
        # [B, max_blocks * block_size, Hkv, D] -> trim -> [B, Hkv, L, D]
        kd = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        vd = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        pos = torch.arange(max_len, device=q.device)
        mask = (pos[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        qd = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[:nd] = od.squeeze(2)
    for start, q_len, ctx_len, block_ids in meta.prefills:
        qp = q[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        if ctx_len == 0:
            # Fresh prompt: its own K/V are all there is; skip the cache read.
            kp = k[start : start + q_len].transpose(0, 1)
            vp = v[start : start + q_len].transpose(0, 1)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            seq_len = ctx_len + q_len
            kp = k_cache[block_ids].view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
            vp = v_cache[block_ids].view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
            # Query i sits at absolute position ctx_len + i and sees keys 0..ctx_len + i.
            qi = torch.arange(q_len, device=q.device)[:, None] + ctx_len
            kj = torch.arange(seq_len, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=kj <= qi, scale=scale, enable_gqa=gqa)
        out[start : start + q_len] = o.transpose(0, 1)
    return out
