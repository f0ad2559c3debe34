"""Random paged-attention cases and their float64 answer, for the CPU and Triton kernel tests."""

from __future__ import annotations

import torch


def paged_case(num_reqs, num_heads, num_kv_heads, head_dim, dtype, block_size=16, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    seq_lens = torch.randint(1, 5 * block_size, (num_reqs,), generator=g).to(torch.int32)
    max_blocks = int(-(-seq_lens.max() // block_size))
    # Blocks scattered across the cache, every request its own.
    perm = torch.randperm(num_blocks, generator=g)[: num_reqs * max_blocks]
    tables = perm.view(num_reqs, max_blocks).to(torch.int32)
    # q as the engine passes it: a view into rows that also hold the keys.
    qk = torch.randn(num_reqs, num_heads + num_kv_heads, head_dim, generator=g).to(dtype)
    q = qk[:, :num_heads]
    return q, cache, tables, seq_lens


def float64_attention(q, cache, tables, seq_lens, scale):
    num_reqs, num_heads, _ = q.shape
    group = num_heads // cache.shape[1]
    out = []
    for b in range(num_reqs):
        kv = cache[:, :, tables[b].long()].flatten(2, 3)[:, :, : int(seq_lens[b])].double()
        k, v = kv[0].repeat_interleave(group, 0), kv[1].repeat_interleave(group, 0)  # [Hq, L, D]
        probs = torch.softmax((k @ q[b].double().unsqueeze(-1)).squeeze(-1) * scale, dim=-1)  # [Hq, L]
        out.append((probs.unsqueeze(1) @ v).squeeze(1))
    return torch.stack(out)


def rotary_case(dtype, num_heads=6, num_kv_heads=2, head_dim=32):
    """A qkv batch of 5 tokens at scattered positions and cache slots, and what the
    PyTorch ops make of it (apply_rotary + write_kv): the reference of both rotary +
    cache kernels (CPU and Triton).

    Returns:
        qkv [5, (Hq + 2 * Hkv) * D], (cos, signed_sin), slots, an empty cache [2, Hkv, 6, 8, D]
        (6 blocks of 8 slots), and the expected rotated q/k heads [5, Hq + Hkv, D] and cache.
    """
    from tokenmill.model.layers.attention import AttentionMetadata, write_kv
    from tokenmill.model.layers.rotary import RotaryEmbedding, apply_rotary

    tokens = 5
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    cos_sin = RotaryEmbedding(head_dim, 64, 10000.0).lookup(torch.tensor([0, 7, 8, 30, 63]), dtype)
    slots = torch.tensor([3, 17, 18, 40, 9])
    cache = torch.zeros(2, num_kv_heads, 6, 8, head_dim, dtype=dtype)
    heads = qkv.view(tokens, -1, head_dim)
    want_qk = apply_rotary(heads[:, : num_heads + num_kv_heads], cos_sin)
    want_cache = cache.clone()
    write_kv(want_cache, want_qk[:, num_heads:], heads[:, num_heads + num_kv_heads:],
             AttentionMetadata(slots, 0, None, None, None, []))
    return qkv, cos_sin, slots, cache, want_qk, want_cache
