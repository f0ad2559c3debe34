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
    llm = LLM(model=real_model_path(), max_model_len=256)
    out = llm.generate(["The code is"], SamplingParams(max_tokens=20, temperature=1.0, seed=0, n=4,
                                                        structured_outputs={"regex": r"[A-Z]{2}[0-9]{3}"}))
    assert all(re.fullmatch(r"[A-Z]{2}[0-9]{3}", s.text) for s in out[0].outputs)
    good = SamplingParams(structured_outputs={"choice": ["a"]})
    bad = SamplingParams(structured_outputs={"json": '{"type": "object",'})
    with pytest.raises(StructuredOutputError, match="invalid JSON schema"):
        llm.generate(["x", "y"], [good, bad])
    assert not llm.engine.has_unfinished_requests()  # nothing was queued, not even the good one
