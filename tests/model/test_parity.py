"""Token-exact greedy parity with Hugging Face transformers, float32, every architecture.

Each case runs a batch of prompts of different lengths through one engine (one flat batch
per step) and compares with transformers' generate run one prompt at a time.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPT_LENS = [3, 17, 30, 5, 41]
NUM_NEW_TOKENS = 12


def make_prompts(vocab_size: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip ids 0-2 (pad/bos/eos) so no prompt contains eos.
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]


def hf_reference(model_dir, prompts: list[list[int]], num_new: int):
    """Greedy continuations and last-position log-probs from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs, last_logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=num_new,
                min_new_tokens=num_new,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
            logits = model(ids).logits[0, -1].float()
            last_logprobs.append(torch.log_softmax(logits, -1))
    return outs, last_logprobs


def run_engine(model_dir, prompts, num_new=NUM_NEW_TOKENS, logprobs=None, **engine_args):
    llm = LLM(str(model_dir), dtype="float32", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, outs


@pytest.mark.parametrize("arch", ["llama", "llama3-rope-tied", "llama-mqa", "qwen2", "qwen3"])
def test_greedy_and_logits_match_transformers(checkpoint_factory, arch, kernel_path):
    model_dir = checkpoint_factory(arch)
    prompts = make_prompts(320)
    ref_tokens, ref_logprobs = hf_reference(model_dir, prompts, NUM_NEW_TOKENS)
    _, outs = run_engine(model_dir, prompts, logprobs=5)
    for out, ref, ref_lp in zip(outs, ref_tokens, ref_logprobs):
        assert out.outputs[0].token_ids == ref
        # Log-probs of the first generated position = the prompt's last-position logits.
        first = out.outputs[0].logprobs[0]
        top_ids = torch.topk(ref_lp, 5).indices.tolist()
        assert set(top_ids) <= set(first)
        for tok in top_ids:
            assert first[tok].logprob == pytest.approx(ref_lp[tok].item(), abs=1e-4)
        assert out.outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def llama_case(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    prompts = make_prompts(320)
    ref_tokens, _ = hf_reference(model_dir, prompts, NUM_NEW_TOKENS)
    return model_dir, prompts, ref_tokens


def test_chunked_prefill_matches(llama_case):
    model_dir, prompts, ref = llama_case
    # 7 tokens a step: every prompt but the shortest is split across steps, and chunks
    # of several requests share a step.
    llm, outs = run_engine(model_dir, prompts, max_num_batched_tokens=7)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_prefix_cache_hits_match(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    shared = make_prompts(320, [37], seed=1)[0]
    tails = make_prompts(320, [4, 9, 1, 13], seed=2)
    prompts = [shared + t for t in tails]
    ref, _ = hf_reference(model_dir, prompts, NUM_NEW_TOKENS)
    llm = LLM(str(model_dir), dtype="float32", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    # First request alone fills the cache; the rest arrive later and reuse its blocks.
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == ref
    # 37 shared tokens = 9 full blocks of 4 reused by each of the 3 later requests.
    assert [o.num_cached_tokens for o in rest] == [36, 36, 36]
    assert llm.engine.kv.prefix_hits >= 3 * 36


def test_preemption_matches_unconstrained(llama_case):
    model_dir, prompts, ref = llama_case
    # 20 blocks of 4 = 80 tokens for 5 requests needing up to 53 tokens each: the
    # scheduler must preempt and recompute to finish them all.
    llm, outs = run_engine(model_dir, prompts, block_size=4, num_kv_blocks=20, max_model_len=64)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == ref
    # Everything was freed at the end.
    assert llm.engine.kv.pool.num_free_blocks == 20
