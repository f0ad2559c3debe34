"""The CUDA path on a real NVIDIA GPU: parity with transformers, the Triton kernels at
production shapes, CUDA graphs, one sync per step. Marked `gpu`; without a CUDA GPU every
test here is reported as skipped ("not run: no CUDA GPU"), and the Triton kernels are
still tested through Triton's interpreter (test_triton_kernels.py, test_triton_engine.py).

Run on a GPU machine: python -m pytest -m gpu tests/model
"""

from __future__ import annotations

import warnings

import pytest
import torch
from paged_cases import float64_attention, paged_case
from test_parity import hf_reference, make_prompts

from tokenmill import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="not run: no CUDA GPU on this machine"),
]


def _greedy(llm, prompts, n, logprobs=None):
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=logprobs)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.mark.parametrize("arch", ["llama", "llama3-rope-tied", "llama-mqa", "qwen2", "qwen3"])
def test_float32_greedy_is_token_exact_with_transformers(checkpoint_factory, arch):
    model_dir = checkpoint_factory(arch)
    prompts = make_prompts(320)
    ref, _ = hf_reference(model_dir, prompts, 12)
    llm = LLM(str(model_dir), dtype="float32", device="cuda")
    assert llm.engine.runner.graphs is not None  # decode steps replayed CUDA graphs
    assert [o.outputs[0].token_ids for o in _greedy(llm, prompts, 12)] == ref


def test_bfloat16_agrees_with_transformers_on_the_default_model():
    """The real model (SmolLM2-135M-Instruct) in bf16 on both sides: the first generated
    token agrees for nearly every prompt and its logprob within bf16 noise."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (the reference must be installed)

    from tokenmill.bench.quality.local import load_transformers_model
    from tokenmill.model.default_model import default_model_path

    try:
        path = str(default_model_path())
    except FileNotFoundError as exc:
        pytest.skip(f"not run: {exc}")
    prompts = make_prompts(49152, [7, 31, 64, 100, 5, 48, 90, 12] * 4, seed=3)
    hf = load_transformers_model(path, "bfloat16").to("cuda")
    outs = _greedy(LLM(path, dtype="bfloat16", device="cuda"), prompts, 1, logprobs=1)
    agree = 0
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            lp = torch.log_softmax(hf(torch.tensor([p], device="cuda")).logits[0, -1].float(), -1)
            tok = out.outputs[0].token_ids[0]
            agree += int(tok == int(lp.argmax()))
            assert out.outputs[0].logprobs[0][tok].logprob == pytest.approx(lp[tok].item(), abs=0.15)
    assert agree >= 0.9 * len(prompts)


def test_cuda_graphs_on_and_off_give_the_same_tokens(checkpoint_factory):
    """20 requests (the 24-row graph, 4 padding rows), then fewer as they finish (every
    bucket below), greedy and seeded: the graphs replay exactly the eager steps."""
    model_dir = str(checkpoint_factory("llama"))
    prompts = [{"prompt_token_ids": p} for p in make_prompts(320, [3 + 2 * i for i in range(20)], seed=4)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=4 + i, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True) for i in range(20)]

    def run(**kwargs):
        llm = LLM(model_dir, dtype="float32", device="cuda", block_size=8, **kwargs)
        return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    graphed, with_graphs = run()
    eager, without = run(enforce_eager=True)
    assert graphed.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    assert with_graphs == without


def test_a_decode_step_syncs_with_the_host_once(checkpoint_factory):
    """The sampled ids are the step's only device-to-host transfer that waits."""
    llm = LLM(str(checkpoint_factory("llama")), dtype="bfloat16", device="cuda")
    engine = llm.engine
    from tokenmill.engine.request import EngineCoreRequest

    params = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(make_prompts(320, [9, 14, 30], seed=5)):
        engine.add_request(EngineCoreRequest(f"r{i}", p, params))
    for _ in range(3):
        engine.step()  # prefill, then decodes
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_kv_cache_is_sized_from_free_device_memory(checkpoint_factory):
    free_before, _ = torch.cuda.mem_get_info()
    llm = LLM(str(checkpoint_factory("llama")), device="cuda", kv_cache_memory_fraction=0.05)
    runner = llm.engine.runner
    kv_bytes = sum(kv.numel() * kv.element_size() for kv in runner.kv_caches)
    assert 0 < kv_bytes <= 0.05 * free_before
    assert llm.config.dtype == torch.bfloat16  # dtype "auto" on a GPU


# ---- the kernels at production shapes ---------------------------------------------------------


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 64), (14, 2, 64), (32, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_at_production_shapes(num_heads, num_kv_heads, head_dim, dtype):
    """64 requests over contexts up to 80 blocks of 16, split-K chosen by the GPU's size."""
    q, cache, tables, seq_lens = paged_case(64, num_heads, num_kv_heads, head_dim, dtype, num_blocks=64 * 80)
    seq_lens = torch.randint(1, 80 * 16, (64,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    tables = torch.randperm(64 * 80).view(64, 80).to(torch.int32)
    exact = float64_attention(q, cache, tables, seq_lens, head_dim**-0.5)
    from tokenmill.model.gpu_kernels.ops import (
        TritonOps,  # on import (here: a GPU) the kernels compile
    )

    out = torch.empty(q.shape, dtype=dtype, device="cuda")
    TritonOps().paged_decode_attention(out, q.cuda(), cache.cuda(), tables.cuda(), seq_lens.cuda(), head_dim**-0.5)
    torch.testing.assert_close(out.cpu().double(), exact, atol=2e-2, rtol=2e-2)


def test_norm_and_race_at_production_shapes():
    from tokenmill.model.gpu_kernels import decode_attention, elementwise, sampling
    from tokenmill.model.layers.keyed_race import exponential_race

    g = torch.Generator().manual_seed(2)
    x, res = (torch.randn(256, 2048, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(2048, generator=g).to(torch.bfloat16)
    want = torch.nn.functional.rms_norm((x + res).float(), (2048,), None, 1e-5).to(torch.bfloat16) * w
    dx, dres = x.cuda(), res.cuda()
    elementwise.rms_norm(dx, dx, w.cuda(), 1e-5, residual=dres)
    torch.testing.assert_close(dx.cpu(), want, atol=1.6e-2, rtol=1.6e-2)
    logits = torch.randn(64, 128256, generator=g) * 4  # Llama 3's vocabulary
    keys = torch.randint(0, 2**62, (64,), generator=g)
    sampled = torch.empty(64, dtype=torch.long, device="cuda")
    sampling.sample_exponential_race(sampled, logits.cuda(), keys)
    assert torch.equal(sampled.cpu(), exponential_race(logits, keys))
    assert decode_attention.num_splits_for(1, 8, 4096, torch.cuda.get_device_properties(0).multi_processor_count) > 1
