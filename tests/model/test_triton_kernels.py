"""The Triton kernels (the GPU path) against the PyTorch ops they replace, on small shapes.

Without a CUDA GPU they run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set
here before any kernel is defined), so every machine tests them; on a GPU they run
compiled (tests/model/test_cuda_gpu.py adds production shapes and the engine there).
"""

from __future__ import annotations

import pytest
import torch

# tests/conftest.py set TRITON_INTERPRET=1 on a machine without a CUDA GPU, before this import.
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

import torch.nn.functional as F  # noqa: E402
from paged_cases import float64_attention, paged_case, rotary_case  # noqa: E402

from tokenmill.model.gpu_kernels import (  # noqa: E402
    decode_attention,
    elementwise,
    interpreted,
    prefill_attention,
    rotary_cache,
    sampling,
)
from tokenmill.model.layers.attention import (  # noqa: E402
    AttentionMetadata,
    paged_attention,
    write_kv,
)
from tokenmill.model.layers.keyed_race import exponential_race  # noqa: E402
from tokenmill.model.layers.norm import RMSNorm  # noqa: E402
from tokenmill.model.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# 16-bit results agree to one rounding of the output; float32 to accumulation order.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = list(TOLERANCE)


def _rounded_like_the_ops(dtype) -> dict:
    """assert_close arguments for results that round where the PyTorch ops round: exact,
    except bfloat16 under Triton's interpreter, which rounds toward zero: a step of bf16 at
    the inputs' magnitude (values up to ~4 here: 2^-5), for each rounding."""
    if dtype == torch.bfloat16 and interpreted():
        return {"atol": 2**-5, "rtol": 2**-7}
    return {"atol": 0, "rtol": 0}


def _on(*tensors):
    """Copies on the kernels' device (never the tensor itself: the kernels write in place),
    views keeping their strides (q as the engine passes it: rows that also hold the keys)."""
    out = []
    for t in tensors:
        if t._base is not None:
            base = t._base.to(DEVICE, copy=True)
            out.append(base.as_strided(t.shape, t.stride(), t.storage_offset()))
        else:
            out.append(t.to(DEVICE, copy=True))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    # GQA (SmolLM2's 9/3), Llama-3.2-1B's group of 4 at 64, MHA at 128, MQA, an odd head size
    [(9, 3, 64), (8, 2, 64), (4, 4, 128), (8, 1, 32), (6, 2, 40)],
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_attention_matches_reference(dtype, num_heads, num_kv_heads, head_dim, num_splits):
    q, cache, tables, seq_lens = paged_case(5, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    exact = float64_attention(q, cache, tables, seq_lens, scale)
    q, cache, tables, seq_lens = _on(q, cache, tables, seq_lens)
    out = torch.empty(q.shape, dtype=dtype, device=DEVICE)
    decode_attention.paged_decode_attention(out, q, cache, tables, seq_lens, scale, num_splits)
    torch.testing.assert_close(out.cpu().double(), exact, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_split_k_over_a_long_context_and_the_padding_it_never_reads():
    """Contexts of up to 600 tokens in 7 splits (the last ones empty for short rows), with
    NaN in every slot past each row's end: nothing past the end leaks in."""
    q, cache, tables, seq_lens = paged_case(3, 8, 2, 64, torch.float32, num_blocks=128, seed=3)
    seq_lens = torch.tensor([600, 17, 1], dtype=torch.int32)
    tables = torch.randperm(128, generator=torch.Generator().manual_seed(5))[:3 * 38].view(3, 38).to(torch.int32)
    exact = float64_attention(q, cache, tables, seq_lens, 0.125)
    for b in range(3):
        last, used = divmod(int(seq_lens[b]), cache.shape[3])
        cache[:, :, tables[b, last + 1:].long()] = float("nan")
        if used:
            cache[:, :, int(tables[b, last]), used:] = float("nan")
    q, cache, tables, seq_lens = _on(q, cache, tables, seq_lens)
    for splits in (1, 7):
        out = torch.empty(q.shape, device=DEVICE)
        decode_attention.paged_decode_attention(out, q, cache, tables, seq_lens, 0.125, splits)
        torch.testing.assert_close(out.cpu().double(), exact, atol=2e-5, rtol=2e-5)


def test_split_count_fills_the_gpu_only_for_long_contexts():
    # H200: 132 SMs. Batch 1 at 4K tokens with 8 KV heads: 16 splits of 256 tokens.
    assert decode_attention.num_splits_for(1, 8, 4096, 132) == 16
    assert decode_attention.num_splits_for(1, 8, 200, 132) == 1  # too short to split
    assert decode_attention.num_splits_for(256, 8, 4096, 132) == 1  # the batch fills the GPU
    assert decode_attention.num_splits_for(1, 1, 131072, 132) == decode_attention.MAX_SPLITS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (3, 3, 128), (8, 2, 40)])
def test_paged_prefill_attention_matches_sdpa(dtype, num_heads, num_kv_heads, head_dim):
    """Three chunks in one launch: a fresh prompt, a chunk after 21 cached tokens (a
    prefix hit or an earlier chunk) and a one-token chunk after 45, against the SDPA path."""
    g = torch.Generator().manual_seed(7)
    block_size, num_blocks = 8, 40
    chunks = [(37, 0), (5, 21), (1, 45)]  # (query tokens, cached tokens)
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: 3 * 7].view(3, 7)
    num_tokens = sum(n for n, _ in chunks)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    slots, prefills, starts, start = [], [], [], 0
    for (n, ctx), table in zip(chunks, tables):
        slots += [int(table[p // block_size]) * block_size + p % block_size for p in range(ctx, ctx + n)]
        prefills.append((start, n, ctx, table[: -(-(ctx + n) // block_size)]))
        starts.append(start)
        start += n
    meta = AttentionMetadata(torch.tensor(slots), 0, None, None, None, prefills)
    write_kv(cache, k, v, meta)
    scale = head_dim**-0.5
    want = paged_attention(q, k, v, cache, meta, scale)

    column = [torch.tensor(c, dtype=torch.int32) for c in (starts, [n for n, _ in chunks], [c for _, c in chunks])]
    q, cache, tables, *column = _on(q, cache, tables.to(torch.int32), *column)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    prefill_attention.paged_prefill_attention(out, q, cache, *column, tables, max(n for n, _ in chunks), scale)
    torch.testing.assert_close(out.cpu(), want, atol=2 * TOLERANCE[dtype], rtol=2 * TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_matches_the_ops(dtype):
    num_heads, head_dim = 6, 40
    qkv, cos_sin, slots, cache, want_qk, want_cache = rotary_case(dtype, num_heads, 2, head_dim)
    got_qkv, got_cache, cos, sin, dev_slots = _on(qkv, cache, *cos_sin, slots)
    rotary_cache.rotary_and_cache(got_qkv, cos, sin, got_cache, dev_slots, num_heads)
    # Bit-exact: each product is rounded to the dtype before the add, as the ops round.
    exact = _rounded_like_the_ops(dtype)
    torch.testing.assert_close(got_qkv.cpu().view(5, -1, head_dim)[:, : want_qk.shape[1]], want_qk, **exact)
    torch.testing.assert_close(got_cache.cpu(), want_cache, **exact)


def test_rotary_and_cache_skips_padding_slots():
    """A slot of -1 (a CUDA graph's padding row) writes nothing to the cache."""
    qkv = torch.randn(2, 4 * 32)
    cos_sin = RotaryEmbedding(32, 8, 10000.0).lookup(torch.tensor([1, 2]), torch.float32)
    cache = torch.zeros(2, 1, 2, 4, 32)
    qkv, cos, sin, cache, slots = _on(qkv, *cos_sin, cache, torch.tensor([5, -1]))
    rotary_cache.rotary_and_cache(qkv, cos, sin, cache, slots, 2)
    written = cache.cpu().view(2, 1, 8, 32).abs().sum(-1)[:, 0]  # [K/V, slot]
    assert (written[:, 5] > 0).all() and (written.sum() == written[:, 5].sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_add_match_the_ops(dtype):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    x, residual = (torch.randn(7, 96, generator=g).to(dtype) for _ in range(2))
    weight, dx, dres = _on(norm.weight.data, x, residual)
    out = torch.empty_like(dx)
    elementwise.rms_norm(out, dx, weight, 1e-5)
    torch.testing.assert_close(out.cpu(), norm._norm(x), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    elementwise.rms_norm(dx, dx, weight, 1e-5, residual=dres)  # in place, as the layers call it
    torch.testing.assert_close(dres.cpu(), x + residual, **_rounded_like_the_ops(dtype))
    torch.testing.assert_close(dx.cpu(), norm._norm(x + residual), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_ops(dtype):
    gate_up = (torch.randn(5, 2 * 80, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    (dev_gate_up,) = _on(gate_up)
    out = torch.empty(5, 80, dtype=dtype, device=DEVICE)
    elementwise.silu_and_mul(out, dev_gate_up)
    gate, up = gate_up.split(80, dim=-1)
    torch.testing.assert_close(out.cpu(), F.silu(gate) * up, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_token_bitmask_forbids_exactly_the_cleared_bits():
    vocab = 1000  # not a multiple of 32: the last word is partial
    g = torch.Generator().manual_seed(9)
    bits = torch.randint(0, 2, (2, 32 * 32), generator=g, dtype=torch.int64)
    words = (bits.view(2, 32, 32) << torch.arange(32)).sum(-1)  # [2, 32] as uint32 values
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    (dev_logits,) = _on(logits)
    elementwise.apply_token_bitmask(dev_logits, bitmask, torch.tensor([2, 0]))
    want = logits.clone()
    want[2][bits[0, :vocab] == 0] = float("-inf")
    want[0][bits[1, :vocab] == 0] = float("-inf")
    assert torch.equal(dev_logits.cpu(), want)


def test_race_draws_the_same_tokens_as_the_torch_twin():
    """The Triton race scores with the CPU kernel's exact float32 operations: the same key
    picks the same token (seeded requests do not depend on the device)."""
    g = torch.Generator().manual_seed(6)
    rows, vocab = 64, 3000  # three chunks of the kernel's 1,024
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[:, 100:200] = float("-inf")  # masked tokens never come
    logits[5] = 0.0  # a flat row: ties broken by the keys alone
    keys = torch.randint(0, 2**62, (rows,), generator=g)
    (dev_logits,) = _on(logits)
    sampled = torch.empty(rows, dtype=torch.long, device=DEVICE)
    sampling.sample_exponential_race(sampled, dev_logits, keys)
    assert torch.equal(sampled.cpu(), exponential_race(logits, keys))
    assert not ((sampled >= 100) & (sampled < 200)).any()
