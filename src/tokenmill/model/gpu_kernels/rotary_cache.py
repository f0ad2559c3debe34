"""Rotary embedding of q and k in place plus the K/V cache write, in one Triton launch.

The twin of the CPU kernel `rotary_and_cache` (csrc/kernels_impl.h) and of
`apply_rotary` + `write_kv` (model/layers): rotate-half layout, each product rounded to
the dtype before the add, as the PyTorch ops round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, cache_ptr, slots_ptr,
    num_heads, num_kv_heads, cache_slots,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: its whole qkv row as [heads, head_dim] (q heads, k heads, v heads).
    token = tl.program_id(0).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    mask = (h < num_heads + 2 * num_kv_heads)[:, None] & dmask[None, :]
    row = qkv_ptr + token * (num_heads + 2 * num_kv_heads) * HEAD_DIM + h[:, None] * HEAD_DIM
    x = tl.load(row + d[None, :], mask=mask, other=0.0)
    partner = tl.load(row + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
    a = (x.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32)
    b = (partner * sin[None, :]).to(dtype).to(tl.float32)
    rotate = (h < num_heads + num_kv_heads)[:, None]  # query and key heads; value heads stay
    y = tl.where(rotate, (a + b).to(dtype), x)
    tl.store(row + d[None, :], y, mask=mask & rotate)
    # Key and value heads into the token's cache slot ([2, Hkv] heads, as the cache's dims).
    slot = tl.load(slots_ptr + token + 0 * h)  # [BLOCK_H], the token's slot in every lane
    kv_head = h - num_heads
    to_cache = mask & ((h >= num_heads) & (slot >= 0))[:, None]  # slot -1: a CUDA graph's padding row
    tl.store(cache_ptr + (kv_head.to(tl.int64)[:, None] * cache_slots + slot[:, None]) * HEAD_DIM + d[None, :], y,
             mask=to_cache)


def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, num_heads: int) -> None:
    """Rotate q and k inside qkv and store k and v in the cache.

    Args:
        qkv: [T, (Hq + 2 * Hkv) * D] contiguous, modified in place.
        cos, signed_sin: [T, 1, D] from RotaryEmbedding.lookup.
        kv_cache: [2, Hkv, num_blocks, block_size, D].
        slot_mapping: [T] int64 flat slot of each token (-1: skip).
    """
    _, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    num_tokens = qkv.shape[0]
    if num_tokens:
        _rotary_cache_kernel[(num_tokens,)](
            qkv, cos, signed_sin, kv_cache, slot_mapping, num_heads, num_kv_heads, num_blocks * block_size,
            HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads + 2 * num_kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            enable_fp_fusion=False,  # float32: no fused multiply-add, each product rounded as the ops round
        )
