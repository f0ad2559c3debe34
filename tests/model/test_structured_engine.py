"""Structured output in the engine (offline API, real model): constrained rows next to
unconstrained ones in one batch, n > 1, seeds, logprobs, and preemption (the matcher
belongs to the request and survives the recompute of its KV cache)."""

from __future__ import annotations

import json
import re

import pytest
from gguf_factory import real_model_path

from tokenmill import LLM, SamplingParams
from tokenmill.structured import StructuredOutputError

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}


def _valid(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"city", "population", "coastal"} and isinstance(value["city"], str)
            and len(value["city"]) <= 20 and isinstance(value["coastal"], bool)
            and isinstance(value["population"], int) and 0 <= value["population"] <= 50000000)


@pytest.mark.usefixtures("requires_cpu_kernels")
def test_constrained_and_free_requests_share_batches_and_survive_preemption():
    # A small KV pool and long free-running neighbours force preemptions mid-output.
    llm = LLM(model=real_model_path(), max_model_len=256, num_kv_blocks=20, block_size=16, max_num_seqs=8)
    prompts = [f"Describe city number {i} as JSON." for i in range(6)]
    params = []
    for i in range(6):
        if i % 2:
            params.append(SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=150, temperature=0.9, seed=i, n=2, logprobs=1,
                                         structured_outputs={"json": SCHEMA}))
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for i, out in enumerate(outs):
        for sample in out.outputs:
            if i % 2:
                assert sample.finish_reason == "length"
            else:
                assert sample.finish_reason == "stop" and _valid(sample.text), sample.text
                assert len(sample.logprobs) == len(sample.token_ids)
    # The same seeds give the same constrained outputs again.
    again = llm.generate(prompts[:1], params[:1])
    assert [s.text for s in again[0].outputs] == [s.text for s in outs[0].outputs]
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_kv_blocks


@pytest.mark.usefixtures("requires_cpu_kernels")
def test_regex_choice_and_errors_offline():
    # 64-token chunks: the 150-token prompts below are prefilled in three steps.
    llm = LLM(model=real_model_path(), max_model_len=256, max_num_batched_tokens=64)
    out = llm.generate(["The code is"], SamplingParams(max_tokens=20, temperature=1.0, seed=0, n=4,
                                                        structured_outputs={"regex": r"[A-Z]{2}[0-9]{3}"}))
    assert all(re.fullmatch(r"[A-Z]{2}[0-9]{3}", s.text) for s in out[0].outputs)
    # Chunked prefill, then a prefix-cache hit on the same long prompt; a stop string inside
    # the grammar's language ends the output there, as it would without a grammar.
    long_prompt = "Here is a list of words: " + ", ".join(["apple", "river", "stone"] * 40) + ". The next word is"
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1, stop=[" then"],
                            structured_outputs={"regex": r" [a-z]{3,8} then [a-z]{3,8}"})
    first, second = (llm.generate([long_prompt], params)[0] for _ in range(2))
    assert second.num_cached_tokens > 0
    for out in (first, second):
        assert re.fullmatch(r" [a-z]{3,8}", out.outputs[0].text) and out.outputs[0].stop_reason == " then"
    assert first.outputs[0].text == second.outputs[0].text
    good = SamplingParams(structured_outputs={"choice": ["a"]})
    bad = SamplingParams(structured_outputs={"json": '{"type": "object",'})
    with pytest.raises(StructuredOutputError, match="invalid JSON schema"):
        llm.generate(["x", "y"], [good, bad])
    assert not llm.engine.has_unfinished_requests()  # nothing was queued, not even the good one


@pytest.mark.parametrize("path", ["kernel", "lookup"])
def test_masks_forbid_exactly_what_the_matcher_forbids_and_leave_other_rows_alone(path, monkeypatch):
    import llguidance
    import torch

    from tokenmill.model import kernels
    from tokenmill.structured import GrammarCompiler, StructuredOutputsParams
    from tokenmill.structured.mask import apply_token_masks, token_masks
    from tokenmill.tokenizer import Tokenizer

    if path == "kernel" and kernels.cpu_kernels() is None:
        pytest.skip("the CPU kernels are not built here")
    if path == "lookup":
        monkeypatch.setattr(kernels, "for_tensor", lambda t: None)
    tokenizer = Tokenizer.load(real_model_path())
    compiler = GrammarCompiler(tokenizer.backend.to_str(), 49152, sorted(tokenizer.eos_token_ids))
    matcher = compiler.matcher(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string"}}}))
    matcher.consume_tokens(tokenizer.backend.encode('{"a":"x', add_special_tokens=False).ids)
    # The reference: every token id whose bit is set in llguidance's little-endian words.
    words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    allowed = ((words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:49152].bool()
    assert 0 < int(allowed.sum()) < 49152
    executor = llguidance.LLExecutor(num_threads=2)
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    apply_token_masks(logits, token_masks([None, matcher, None], 49152, executor))
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.equal(logits[1][allowed], before[1][allowed]) and (logits[1][~allowed] == float("-inf")).all()
    every = torch.randn(1, 49152)
    apply_token_masks(every, token_masks([matcher], 49152, executor))  # the all-rows path
    assert torch.equal(torch.isfinite(every[0]), allowed)
    narrow = torch.randn(1, 49150)  # a vocabulary that ends inside a mask word
    apply_token_masks(narrow, token_masks([matcher], 49150, executor))
    assert torch.equal(torch.isfinite(narrow[0]), allowed[:49150])
    assert token_masks([None, None], 49152, executor) is None


@pytest.mark.usefixtures("requires_cpu_kernels")
def test_a_grammar_dead_end_ends_the_request_and_frees_its_blocks():
    llm = LLM(model=real_model_path(), max_model_len=256)
    free_before = llm.engine.scheduler.kv.pool.num_free_blocks
    rid = llm._add_request("x", llm.tokenizer.encode("Name a colour:"),
                           SamplingParams(max_tokens=30, structured_outputs={"regex": "[a-z]{10,20}"}))
    llm._step()
    [req] = llm.engine.scheduler.running
    # A dead end, as a parser limit hit mid-output would leave it: the matcher refuses a token.
    assert not req.matcher.consume_token(llm.tokenizer.encode("7", add_special_tokens=False)[0])
    finished = [o for _ in range(3) for o in llm._step() if o.finished]
    [out] = [o for o in finished if o.request_id == rid]
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].stop_reason == "grammar_dead_end"
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.kv.pool.num_free_blocks == free_before
