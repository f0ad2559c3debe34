"""The engine on its GPU path (Triton kernels in every layer that has one), run on the CPU
through Triton's interpreter: token-exact with transformers, as the CPU path is.

What the kernel tests cannot show: that the runner hands the kernels the right tables,
slots and chunk metadata in real steps (prefix hits, chunked prefill, preemption, padding
of the decode tables), and that seeded sampling draws the same tokens on either path.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import NUM_NEW_TOKENS, hf_reference, make_prompts, run_engine

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("arch", ["llama", "llama-mqa", "qwen2", "qwen3"])
def test_greedy_matches_transformers_on_the_triton_path(checkpoint_factory, arch):
    model_dir = checkpoint_factory(arch)
    prompts = make_prompts(320, [3, 17, 30])
    ref, ref_logprobs = hf_reference(model_dir, prompts, NUM_NEW_TOKENS)
    llm, outs = run_engine(model_dir, prompts, logprobs=3)
    runner = llm.engine.runner
    assert runner.decode_kernel and runner.inputs is not None  # the GPU path ran, not the CPU one
    for out, want, want_lp in zip(outs, ref, ref_logprobs):
        assert out.outputs[0].token_ids == want
        first = out.outputs[0].logprobs[0]
        for tok in torch.topk(want_lp, 3).indices.tolist():
            assert first[tok].logprob == pytest.approx(want_lp[tok].item(), abs=1e-4)


def test_chunked_prefill_prefix_hits_and_preemption_on_the_triton_path(checkpoint_factory):
    """Chunks of 16 tokens (a prompt's later chunks attend to its earlier ones in the cache),
    a shared 24-token prefix served from the prefix cache, and too few blocks for every
    request at once (preemption and recompute): still transformers' tokens."""
    model_dir = checkpoint_factory("llama")
    shared = make_prompts(320, [24], seed=21)[0]
    prompts = [shared + p for p in make_prompts(320, [9, 30, 2], seed=22)] + make_prompts(320, [40], seed=23)
    ref, _ = hf_reference(model_dir, prompts, 10)
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=64,
              max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.kv.prefix_hits > 0


def test_seeded_sampling_and_garbage_kv_memory_on_the_triton_path(checkpoint_factory, monkeypatch):
    """A seed draws the same tokens on the Triton path as on the CPU path (the race uses the
    same float32 operations), and NaN in never-written KV memory does not leak in."""
    from tokenmill.model import gpu_kernels

    model_dir = str(checkpoint_factory("llama"))
    prompts = [{"prompt_token_ids": p} for p in make_prompts(320, [5, 23], seed=3)]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, ignore_eos=True, seed=11)
    llm = LLM(model_dir, dtype="float32", block_size=8)
    for kv in llm.engine.runner.kv_caches:
        kv.fill_(float("nan"))
    on_triton = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    monkeypatch.setenv(gpu_kernels.ENV_SWITCH, "0")
    gpu_kernels.mode.cache_clear()
    on_cpu = [o.outputs[0].token_ids for o in LLM(model_dir, dtype="float32", block_size=8).generate(
        prompts, params, use_tqdm=False)]
    assert on_triton == on_cpu


def test_speculative_decoding_on_the_triton_path(checkpoint_factory):
    """ngram and a draft model (its runner keeps its own persistent tables) with preemption
    mid-output: the tokens of the run without speculation. The draft is the model itself,
    so every proposal is accepted and the draft's tables are exercised on every step."""
    model_dir = str(checkpoint_factory("llama"))
    prompts = [{"prompt_token_ids": p} for p in make_prompts(320, [6, 20], seed=41)]
    prompts[0]["prompt_token_ids"] *= 4  # repeats for the ngram proposer to find
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    always = {"disable_by_batch_size": None, "adaptive": False}
    specs = [None, {"method": "ngram", "num_speculative_tokens": 3} | always,
             {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 3} | always]
    runs = []
    for spec in specs:
        llm = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=12, max_model_len=48,
                  speculative_config=spec)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.engine.stats().num_preemptions > 0
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def test_a_request_id_used_again_gets_fresh_tables(checkpoint_factory):
    """Ids come from callers (the server's request ids): once a request has finished, a
    new one with its id must not read the old one's blocks through a remembered table row."""
    from tokenmill.engine.request import EngineCoreRequest

    model_dir = str(checkpoint_factory("llama"))
    first, second = make_prompts(320, [30, 21], seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def run(engine, prompt):
        engine.add_request(EngineCoreRequest("same-id", prompt, params))
        tokens = []
        while engine.has_unfinished_requests():
            tokens += [t for out in engine.step() for t in out.new_token_ids]
        return tokens

    # No prefix caching: the second request gets other blocks than the first had.
    engine = LLM(model_dir, dtype="float32", block_size=4, enable_prefix_caching=False).engine
    run(engine, first)
    fresh = LLM(model_dir, dtype="float32", block_size=4, enable_prefix_caching=False).engine
    assert run(engine, second) == run(fresh, second)
