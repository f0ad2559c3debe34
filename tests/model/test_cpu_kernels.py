"""The compiled CPU kernels against the PyTorch ops they replace.

Each kernel is checked, on every instruction-set path this CPU can run (the `isa`
fixture: generic, avx2, avx512), against the fallback code path of the same layer (what
runs without the kernels) and, for attention, against float64 softmax attention computed
per request. The engine-level tests at the end run a whole model both ways.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paged_cases import float64_attention, paged_case, rotary_case

from tokenmill import LLM, SamplingParams
from tokenmill.model import kernels
from tokenmill.model.layers.attention import (
    AttentionMetadata,
    _decode_attention,
    decode_mask,
)
from tokenmill.model.layers.norm import RMSNorm

ops = kernels.cpu_kernels()  # with TOKENMILL_CPU_KERNELS=require (CI) a failed build fails here
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here (see the log)")

# 16-bit results agree to one rounding of the output; float32 to accumulation order.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = list(TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    # GQA, MHA, MQA; fixed and generic sizes; 36 leaves a tail after whole vectors
    [(9, 3, 64), (14, 2, 64), (4, 4, 128), (8, 1, 32), (6, 2, 48), (2, 1, 36)],
)
def test_paged_decode_attention_matches_reference(dtype, num_heads, num_kv_heads, head_dim, isa):
    q, cache, tables, seq_lens = paged_case(5, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = torch.empty(q.shape, dtype=dtype)
    ops.paged_decode_attention(out, q, cache, tables, seq_lens, scale)
    exact = float64_attention(q, cache, tables, seq_lens, scale)
    torch.testing.assert_close(out.double(), exact, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    # And the batched-matmul fallback the engine uses without the kernel.
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decodes=len(seq_lens),
        decode_block_tables=tables,
        decode_seq_lens=seq_lens,
        decode_mask=decode_mask(seq_lens, tables.shape[1], cache.shape[3]),
        prefills=[],
    )
    fallback = _decode_attention(q.contiguous(), cache, meta, scale)
    torch.testing.assert_close(out.double(), fallback.double(), atol=2 * TOLERANCE[dtype], rtol=2 * TOLERANCE[dtype])


def test_paged_decode_attention_ignores_blocks_past_the_end(isa):
    """Table padding and the tail of the last block must not leak into the result."""
    q, cache, tables, seq_lens = paged_case(3, 9, 3, 64, torch.float32)
    out = torch.empty(q.shape)
    ops.paged_decode_attention(out, q, cache, tables, seq_lens, 0.125)
    poisoned = cache.clone()
    for b in range(3):
        last, used = divmod(int(seq_lens[b]), cache.shape[3])
        poisoned[:, :, tables[b, last + 1 :].long()] = float("nan")
        if used:
            poisoned[:, :, int(tables[b, last]), used:] = float("nan")
    again = torch.empty(q.shape)
    ops.paged_decode_attention(again, q, poisoned, tables, seq_lens, 0.125)
    assert torch.equal(out, again)


def test_paged_decode_attention_rejects_bad_input():
    q, cache, tables, seq_lens = paged_case(2, 9, 3, 64, torch.float32)
    out = torch.empty(q.shape)
    with pytest.raises(RuntimeError, match="int32"):
        ops.paged_decode_attention(out, q, cache, tables.long(), seq_lens, 0.125)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.paged_decode_attention(out, q.to(torch.bfloat16), cache, tables, seq_lens, 0.125)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_kernels_match_fallback(dtype, isa):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    x, residual = (torch.randn(7, 96, generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(norm(x), norm._norm(x), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    want_residual = x + residual
    want = norm._norm(want_residual)
    got, got_residual = norm(x.clone(), residual.clone())  # the kernel writes in place
    assert torch.equal(got_residual, want_residual)
    torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_matches_fallback(dtype, isa):
    num_heads, head_dim = 6, 32
    qkv, cos_sin, slots, cache, want_qk, want_cache = rotary_case(dtype, num_heads, 2, head_dim)
    ops.rotary_and_cache(qkv_kernel := qkv.clone(), *cos_sin, cache_kernel := cache.clone(), slots, num_heads)
    # Bit-exact: the kernel rounds where the ops do, with the same conversions (no fused
    # multiply-adds here).
    exact = {"atol": 0, "rtol": 0}
    torch.testing.assert_close(qkv_kernel.view(5, -1, head_dim)[:, : want_qk.shape[1]], want_qk, **exact)
    torch.testing.assert_close(cache_kernel, want_cache, **exact)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rotary_and_cache(qkv.clone(), *cos_sin, cache, torch.tensor([3, 17, 18, 48, 9]), num_heads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_fallback(dtype, isa):
    gate_up = (torch.randn(5, 2 * 80, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    out = torch.empty(5, 80, dtype=dtype)
    ops.silu_and_mul(out, gate_up)
    gate, up = gate_up.split(80, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_paged_decode_attention_rejects_a_bad_table():
    q, cache, tables, seq_lens = paged_case(2, 9, 3, 64, torch.float32, num_blocks=64)
    out = torch.empty(q.shape)
    bad = tables.clone()
    bad[1, 0] = 64  # one past the last block
    with pytest.raises(RuntimeError, match="block id 64 out of range"):
        ops.paged_decode_attention(out, q, cache, bad, seq_lens, 0.125)
    too_long = seq_lens.clone()
    too_long[0] = tables.shape[1] * cache.shape[3] + 1
    with pytest.raises(RuntimeError, match="seq_len"):
        ops.paged_decode_attention(out, q, cache, tables, too_long, 0.125)


def test_more_query_heads_per_kv_head_than_the_kernel_takes_use_the_fallback(checkpoint_factory):
    """16 query heads on one KV head: the runner must pick the batched-matmul path."""
    from test_parity import hf_reference, make_prompts

    model_dir = checkpoint_factory("llama", num_attention_heads=16, num_key_value_heads=1)
    prompts = make_prompts(320, [5, 12], seed=5)
    llm = LLM(str(model_dir), dtype="float32")
    assert not llm.engine.runner.decode_kernel
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref, _ = hf_reference(model_dir, prompts, 8)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_exponential_race_follows_the_distribution_over_a_large_vocab(isa):
    """Uniform over 2,000 tokens except a masked block: every bucket of 100 token ids gets
    its share (the keyed draws have no index bias), the masked ids never come."""
    rows, vocab = 40_000, 2_000
    logits = torch.zeros(rows, vocab)
    logits[:, 1_000:1_100] = float("-inf")
    out = torch.empty(rows, dtype=torch.long)
    ops.sample_exponential_race(out, logits, torch.randint(0, 2**62, (rows,)))
    buckets = torch.bincount(out // 100, minlength=20)
    assert buckets[10] == 0
    p = 1 / 19
    sigma = (p * (1 - p) / rows) ** 0.5
    shares = buckets.double() / rows
    assert ((shares - p).abs()[torch.arange(20) != 10] < 5 * sigma).all(), buckets.tolist()
    # Same keys, same draws.
    once, twice = torch.empty(5, dtype=torch.long), torch.empty(5, dtype=torch.long)
    ops.sample_exponential_race(once, logits[:5], torch.arange(5))
    ops.sample_exponential_race(twice, logits[:5], torch.arange(5))
    assert torch.equal(once, twice)


def test_engine_gives_the_same_tokens_without_kernels(checkpoint_factory, monkeypatch):
    """Float32 greedy and seeded sampled decoding are token-identical with the kernels and
    the fallback (the seeded draws are the same race; see the sampling test above)."""
    model_dir = checkpoint_factory("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, 320, (n,), generator=g).tolist()} for n in (5, 23, 40)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True, seed=11)

    def generate():
        llm = LLM(str(model_dir), dtype="float32", block_size=8)
        return [o.outputs[0].token_ids for params in (greedy, sampled)
                for o in llm.generate(prompts, params, use_tqdm=False)]

    with_kernels = generate()
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
    assert generate() == with_kernels


def test_every_path_the_cpu_supports_is_available():
    """The paths the library offers follow the CPU's flags (generic always)."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    expected = ["generic"]
    if {"avx2", "fma", "f16c"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            expected.append("avx512")
    assert kernels.available_isas() == expected
    assert kernels.selected_isa() == expected[-1]  # the widest by default
    with pytest.raises(RuntimeError, match="cannot run on this CPU; available: generic"):
        ops.set_cpu_isa("sse9")


def test_sampling_kernel_draws_exactly_what_the_pytorch_race_draws(isa):
    """Same keys, same tokens: seeded output does not depend on the kernels being built.
    Logits with masked tokens, ties, one-token and large vocabularies."""
    from tokenmill.model.layers.keyed_race import exponential_race

    g = torch.Generator().manual_seed(9)
    for rows, vocab in [(64, 49_152), (300, 1_000), (2_000, 3), (3, 152_064)]:
        logits = torch.randn(rows, vocab, generator=g) * 3
        logits[logits < -4] = float("-inf")
        logits[:, 0] = logits[:, 1]  # equal probabilities
        logits[-1] = float("-inf")  # every token masked (the engine never sends such a row)
        keys = torch.randint(0, 2**62, (rows,), generator=g)
        out = torch.empty(rows, dtype=torch.long)
        ops.sample_exponential_race(out, logits, keys)
        assert torch.equal(out, exponential_race(logits, keys)), (rows, vocab)


def test_wide_instructions_stay_in_their_own_paths():
    """The library is built once for every x86-64 CPU: AVX instructions (VEX-encoded, `v...`
    mnemonics) may appear only in the avx2 and avx512 paths, and AVX-512 ones (zmm and
    xmm16-31 registers, opmasks, embedded broadcasts) only in avx512, or an older CPU would
    crash in a shared helper. This runs on CPUs that cannot execute the wide paths too."""
    import re
    import shutil
    import subprocess

    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(kernels.library_path())],
                             capture_output=True, text=True, check=True).stdout
    avx512 = re.compile(r"%zmm|%k[1-7]|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to\d+\}")
    function, vex, evex = "", set(), set()
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
            continue
        fields = line.split("\t")
        mnemonic = fields[1].split()[0] if len(fields) > 1 and fields[1].strip() else ""
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
            vex.add(function)
        if avx512.search(line):
            evex.add(function)
    assert evex, "no AVX-512 code at all: was the avx512 path compiled?"
    # (template names start with their return type: "void tmk::avx512::decode_attention<...")
    assert all("tmk::avx512::" in f for f in evex), sorted(f for f in evex if "tmk::avx512::" not in f)[:5]
    stray = sorted(f for f in vex if "tmk::avx512::" not in f and "tmk::avx2::" not in f)
    assert not stray, stray[:5]
