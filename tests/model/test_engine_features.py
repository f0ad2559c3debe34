"""Engine features end to end on a tiny checkpoint: seeds, n>1, stops, logprobs, aborts."""

from __future__ import annotations

import pytest
import torch
from test_parity import make_prompts

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    return LLM(str(checkpoint_factory("llama")), dtype="float32", block_size=4)


def gen(llm, prompts, **params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params), use_tqdm=False)
    return [o.outputs for o in outs]


def test_seed_reproducible_whatever_the_batch(llm):
    p = make_prompts(320, [9], seed=3)[0]
    others = make_prompts(320, [5, 20, 12], seed=4)
    alone = gen(llm, [p], temperature=1.0, seed=123, max_tokens=16, ignore_eos=True)[0][0].token_ids
    # Same request placed in the middle of a batch of unseeded and other-seeded requests.
    params = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=s) for s in (None, 7, 123, None)]
    outs = llm.generate([{"prompt_token_ids": x} for x in [others[0], others[1], p, others[2]]], params, use_tqdm=False)
    assert outs[2].outputs[0].token_ids == alone
    other_seed = gen(llm, [p], temperature=1.0, seed=124, max_tokens=16, ignore_eos=True)[0][0].token_ids
    assert other_seed != alone


def test_n_samples_share_prompt_blocks_and_differ(llm):
    p = make_prompts(320, [30], seed=5)[0]
    hits_before = llm.engine.kv.prefix_hits
    outs = gen(llm, [p], n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)[0]
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    # Samples 1 and 2 reuse sample 0's 7 full prompt blocks (28 tokens) each.
    assert llm.engine.kv.prefix_hits - hits_before >= 2 * 28
    # Seeded n>1: sample i uses seed+i, so the whole set is reproducible.
    again = gen(llm, [p], n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)[0]
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    p = make_prompts(320, [6], seed=6)[0]
    greedy = gen(llm, [p], temperature=0.0, max_tokens=10, ignore_eos=True)[0][0].token_ids
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    out = gen(llm, [p], temperature=0.0, max_tokens=10, stop_token_ids=[stop_tok])[0][0]
    assert out.token_ids == greedy[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    # min_tokens masks the stop token: the output changes and runs past it.
    out = gen(llm, [p], temperature=0.0, max_tokens=10, stop_token_ids=[stop_tok], min_tokens=first + 2)[0][0]
    assert stop_tok not in out.token_ids[: first + 2]
    assert len(out.token_ids) >= first + 2


def test_stop_string_is_not_returned(llm):
    p = make_prompts(320, [6], seed=8)[0]
    full = gen(llm, [p], temperature=0.0, max_tokens=12, ignore_eos=True, skip_special_tokens=True)[0][0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    first = text.index(stop)
    out = gen(llm, [p], temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])[0][0]
    assert out.text == text[:first]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_prompt_logprobs_match_transformers(llm, checkpoint_factory):
    from transformers import AutoModelForCausalLM

    p = make_prompts(320, [21], seed=9)[0]
    out = llm.generate(
        [{"prompt_token_ids": p}],
        SamplingParams(max_tokens=0, prompt_logprobs=2, temperature=0.0),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint_factory("llama"), dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([p])).logits[0].float(), -1)
    for pos in range(1, len(p)):
        entry = out.prompt_logprobs[pos]
        assert entry[p[pos]].logprob == pytest.approx(lp[pos - 1, p[pos]].item(), abs=1e-4)
        assert entry[p[pos]].rank == int((lp[pos - 1] > lp[pos - 1, p[pos]]).sum()) + 1
        assert len(entry) <= 3  # the prompt token plus top-2


def test_abort_frees_blocks_and_engine_continues(llm):
    from tokenmill.engine.request import EngineCoreRequest

    core = llm.engine
    free_before = core.kv.pool.num_free_blocks
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    params.all_stop_token_ids = set()
    core.add_request(EngineCoreRequest("x", make_prompts(320, [30], seed=10)[0], params))
    core.step()
    assert core.kv.pool.num_free_blocks < free_before
    core.abort_requests(["x"])
    assert core.kv.pool.num_free_blocks == free_before
    assert not core.has_unfinished_requests()
    assert gen(llm, [[5, 6, 7]], temperature=0.0, max_tokens=3, ignore_eos=True)[0][0].finish_reason == "length"


def test_invalid_requests_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [5] * 300}], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([{"prompt_token_ids": [5, 100000]}], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    # Nothing was left behind by the refused requests.
    assert not llm.engine.has_unfinished_requests()


def test_text_prompts_and_chat(llm):
    outs = llm.generate(["ROMEO: But soft", "JULIET:"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok.encode("ROMEO: But soft")
    assert outs[0].prompt_token_ids[0] == tok.bos_token_id
    chat = llm.chat([{"role": "user", "content": "Speak"}], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert chat.prompt_token_ids == tok.encode_chat([{"role": "user", "content": "Speak"}])
    assert len(chat.outputs[0].token_ids) == 4
    streamed = "".join(llm.stream("ROMEO: But soft", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)))
    assert streamed == outs[0].outputs[0].text


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", 0.15), ("float16", 0.02)])
def test_16_bit_dtypes_close_to_float32(checkpoint_factory, kernel_path, dtype, tolerance):
    """Every dtype runs on every CPU (oneDNN packs 16-bit weights only with AVX-512; the
    plain path runs elsewhere), with and without the kernels, close to float32."""
    model_dir = str(checkpoint_factory("qwen2"))
    p = make_prompts(320, [12], seed=11)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    f32 = LLM(model_dir, dtype="float32").generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
    low = LLM(model_dir, dtype=dtype).generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
    a, b = f32.outputs[0].logprobs[0], low.outputs[0].logprobs[0]
    common = set(a) & set(b)
    assert len(common) >= 3
    for tok in common:
        assert a[tok].logprob == pytest.approx(b[tok].logprob, abs=tolerance)


def test_garbage_in_fresh_kv_memory_is_harmless(checkpoint_factory, kernel_path):
    # The KV cache is allocated uninitialised; fill it with NaN to make sure no masked
    # slot (decode padding, unwritten block tails) ever leaks into attention.
    model_dir = str(checkpoint_factory("llama"))
    prompts = [{"prompt_token_ids": p} for p in make_prompts(320, [3, 9, 14], seed=12)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    clean = [o.outputs[0].token_ids for o in LLM(model_dir, dtype="float32", block_size=4).generate(prompts, params, use_tqdm=False)]
    llm = LLM(model_dir, dtype="float32", block_size=4)
    for kv in llm.engine.runner.kv_caches:
        kv.fill_(float("nan"))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == clean


def test_prompt_logprobs_survive_preemption(checkpoint_factory):
    # A tiny pool forces the long-prompt request to be preempted and recomputed; its
    # prompt must still be scored exactly once per position, with the same values.
    model_dir = str(checkpoint_factory("llama"))
    prompts = make_prompts(320, [40, 30, 35], seed=13)
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=1)] * 3
    ref = LLM(model_dir, dtype="float32", block_size=4).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    llm = LLM(model_dir, dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=64, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out, r, p in zip(outs, ref, prompts):
        assert len(out.prompt_logprobs) == len(p)
        for pos in range(1, len(p)):
            assert out.prompt_logprobs[pos][p[pos]].logprob == pytest.approx(r.prompt_logprobs[pos][p[pos]].logprob, abs=1e-4)
        assert out.outputs[0].token_ids == r.outputs[0].token_ids


def test_stop_token_text_is_not_returned(llm):
    p = make_prompts(320, [6], seed=14)[0]
    greedy = gen(llm, [p], temperature=0.0, max_tokens=8, ignore_eos=True)[0][0]
    stop_tok = greedy.token_ids[2]
    first = greedy.token_ids.index(stop_tok)
    out = gen(llm, [p], temperature=0.0, max_tokens=8, stop_token_ids=[stop_tok])[0][0]
    assert out.token_ids == greedy.token_ids[: first + 1]  # the id is reported...
    # ...its text is not (vLLM): the text is that of the tokens before it.
    before = gen(llm, [p], temperature=0.0, max_tokens=first, ignore_eos=True)[0][0] if first else None
    assert out.text == (before.text if before else "")


def test_stream_stopped_early_frees_its_request(llm):
    it = llm.stream([5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    next(it)
    it.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_kv_blocks


def test_checkpoint_without_tokenizer_runs_on_token_ids(checkpoint_factory, tmp_path):
    """skip_tokenizer_init (vLLM's name): config + weights only; ids in, ids out, the same
    ids as with the tokenizer; text prompts, chat and stop strings get a clear error."""
    import shutil

    full = checkpoint_factory("llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(full / name, bare / name)
    prompt = {"prompt_token_ids": [5, 17, 42, 99, 7]}
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        LLM(str(bare), dtype="float32")
    llm = LLM(str(bare), dtype="float32", skip_tokenizer_init=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    want = LLM(str(full), dtype="float32").generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want.token_ids and len(out.token_ids) == 12
    assert out.text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        llm.generate("ROMEO:", params, use_tqdm=False)
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need the tokenizer"):
        llm.generate(prompt, SamplingParams(max_tokens=4, stop=["x"]), use_tqdm=False)
