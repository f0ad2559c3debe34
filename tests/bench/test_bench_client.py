"""The streaming client against the scripted fake server on a virtual clock: exact timings."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from bench_fake_openai import FakeState, Script, VirtualClock, VirtualTransport, uniform_script

from tokenmill.bench.client import EndpointSpec, build_payload, send_request, split_base_url
from tokenmill.bench.metrics import request_itls_s, request_tpot_s, summarize
from tokenmill.bench.schema import RequestSample, RequestSpec

REQ = RequestSpec(index=0, prompt="t1 t2 t3", prompt_len=3, output_len=5)


def run_one(script: Script, endpoint="completions", count_tokens=None, **spec_kw) -> tuple[RequestSample, FakeState]:
    state = FakeState(lambda body: script)
    clock = VirtualClock()
    spec = EndpointSpec("http://fake/v1", "fake-model", endpoint, **spec_kw)

    async def go():
        async with httpx.AsyncClient(transport=VirtualTransport(state, clock)) as client:
            sample = RequestSample(index=0, start_s=0.0)
            return await send_request(client, spec, REQ, sample, count_tokens, clock)

    return asyncio.run(go()), state


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_exact_ttft_itl_tpot_with_continuous_usage(endpoint):
    s, _ = run_one(uniform_script(5, ttft_s=0.25, itl_s=0.05), endpoint)
    assert s.status == "ok", s.error
    assert s.ttft_s == pytest.approx(0.25, abs=1e-9)  # the chat role chunk at t=0 is not a token
    assert s.e2e_s == pytest.approx(0.25 + 4 * 0.05, abs=1e-9)
    assert request_itls_s(s) == pytest.approx([0.05] * 4, abs=1e-9)
    assert request_tpot_s(s) == pytest.approx(0.05, abs=1e-9)
    assert (s.output_tokens, s.prompt_tokens, s.token_count_source) == (5, 7, "usage")


def test_multi_token_chunks_with_continuous_usage():
    script = Script(ttft_s=0.1, chunks=[(0.0, 1), (0.3, 3), (0.1, 1)], usage="continuous")
    s, _ = run_one(script)
    assert s.chunk_tokens == [1, 3, 1]
    assert request_itls_s(s) == pytest.approx([0.1] * 4, abs=1e-9)
    assert request_tpot_s(s) == pytest.approx(0.4 / 4, abs=1e-9)


def test_multi_token_chunks_with_final_usage_only_are_retokenized():
    script = Script(ttft_s=0.1, chunks=[(0.0, 1), (0.2, 2), (0.1, 1)], usage="final")
    s, _ = run_one(script, count_tokens=words)
    assert s.output_tokens == 4 and s.token_count_source == "usage"
    assert s.chunk_tokens == [1, 2, 1]
    assert request_itls_s(s) == pytest.approx([0.1, 0.1, 0.1], abs=1e-9)


def test_no_usage_counts_with_tokenizer_or_chunks():
    script = Script(ttft_s=0.1, chunks=[(0.0, 2), (0.1, 1)], usage="none")
    s, _ = run_one(script, count_tokens=words)
    assert (s.output_tokens, s.token_count_source, s.prompt_tokens) == (3, "tokenizer", 3)
    s, _ = run_one(script)
    assert (s.output_tokens, s.token_count_source, s.chunk_tokens) == (2, "chunks", [1, 1])


def test_errors_are_reported_not_timed():
    s, _ = run_one(Script(status=500))
    assert s.status == "error" and "HTTP 500" in s.error
    s, _ = run_one(Script(ttft_s=0.1, chunks=[(0.0, 1), (0.1, 1), (0.1, 1)], cut_after=2))
    assert s.status == "error" and "without [DONE]" in s.error
    summary = summarize([s], duration_s=1.0)
    assert summary.num_failed == 1 and summary.ttft.count == 0


def test_payload_fields_and_strict_mode():
    spec = EndpointSpec("http://x/v1", "m", "chat", extra_body={"top_k": 1}, temperature=0.0)
    body = build_payload(spec, REQ)
    assert body["messages"] == [{"role": "user", "content": "t1 t2 t3"}]
    assert body["max_tokens"] == 5 and body["ignore_eos"] is True and body["top_k"] == 1
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True,
                                                                 "continuous_usage_stats": True}
    strict = build_payload(EndpointSpec("http://x/v1", "m", openai_strict=True), REQ)
    assert "ignore_eos" not in strict and strict["stream_options"] == {"include_usage": True}
    assert strict["prompt"] == "t1 t2 t3"
    assert split_base_url("http://h:1/v1/") == ("http://h:1", "http://h:1/v1")
    assert split_base_url("http://h:1") == ("http://h:1", "http://h:1/v1")
