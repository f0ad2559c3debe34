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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (token, head) of the qkv row: q heads, then k heads, then v heads.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dtype = qkv_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    row = qkv_ptr + token * (num_heads + 2 * num_kv_heads) * HEAD_DIM + head * HEAD_DIM
    x = tl.load(row + d, mask=dmask, other=0.0)
    if head < num_heads + num_kv_heads:  # a query or key head: rotate it
        partner = tl.load(row + (d + HEAD_DIM // 2) % HEAD_DIM, mask=dmask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + token * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + token * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
        a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
        b = (partner * sin).to(dtype).to(tl.float32)
        x = (a + b).to(dtype)
        # Every load of this row happened above; only this program touches this head.
        tl.store(row + d, x, mask=dmask)
    if head >= num_heads:  # a key or value head: into the token's cache slot
        slot = tl.load(slots_ptr + token)
        kv_head = head - num_heads  # 0..2*Hkv-1: K heads, then V heads, as the cache's [2, Hkv] dims
        if slot >= 0:  # -1: a padding token (a CUDA graph's unused rows) writes nothing
            tl.store(cache_ptr + (kv_head * cache_slots + slot) * HEAD_DIM + d, x, mask=dmask)


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
        _rotary_cache_kernel[(num_tokens, num_heads + 2 * num_kv_heads)](
            qkv, cos, signed_sin, kv_cache, slot_mapping, num_heads, num_kv_heads, num_blocks * block_size,
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        )
