"""The official openai client against a real server: completions, chat, streaming, n>1,
logprobs, seeds, stop strings, usage, prompt scoring, many concurrent streams."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from server_harness import MODEL_NAME

from tokenmill.engine.llm import LLM
from tokenmill.sampling_params import SamplingParams

PROMPT = "ROMEO: But soft"
GREEDY_LONG = {"ignore_eos": True}


def client_tokenize(client, text: str) -> list[int]:
    base = str(client.base_url).removesuffix("/v1/")
    return httpx.post(base + "/tokenize", json={"prompt": text}).json()["tokens"]


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_shape_and_usage(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body=GREEDY_LONG)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL_NAME
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(client_tokenize(client, PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_streamed_completion_matches_non_streamed(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body=GREEDY_LONG)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=GREEDY_LONG))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1  # streamed piece by piece, not buffered to the end
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_multiple_prompts_and_n_index_choices(client):
    for prompts, num_prompt_tokens in (
        (["ROMEO:", "JULIET: O"], len(client_tokenize(client, "ROMEO:") + client_tokenize(client, "JULIET: O"))),
        ([[1, 40, 41, 42], [1, 43]], 6),
    ):
        out = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=3, temperature=1.0,
                                        seed=7, extra_body=GREEDY_LONG)
        assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == num_prompt_tokens
    # Same prompt and seed at index 0 and 1 of a two-prompt request: the same samples.
    out = client.completions.create(model=MODEL_NAME, prompt=["ROMEO:", "ROMEO:"], max_tokens=8,
                                    temperature=1.0, seed=3, extra_body=GREEDY_LONG)
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1]


def test_seed_reproducibility(client):
    def run(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         seed=seed, n=2, extra_body=GREEDY_LONG)
    a, b, c = run(1234), run(1234), run(99)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # samples of one request use different seeds


def test_stop_string_cuts_text_and_reports_it(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body=GREEDY_LONG).choices[0].text
    stop = full[6:8]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                         stop=[stop], stream=stream, extra_body=GREEDY_LONG)
        if stream:
            chunks = [c for c in resp if c.choices]
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = resp.choices[0].text, resp.choices[0].finish_reason
            assert resp.choices[0].model_extra["stop_reason"] == stop
        assert text == expected and finish == "stop"


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                    extra_body=GREEDY_LONG)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # The chosen token plus the top 2 (fewer when texts coincide, e.g. partial UTF-8 bytes).
        assert value <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value)  # greedy picks the most likely
        assert top[token] == pytest.approx(value)
    assert max(len(top) for top in lp.top_logprobs) >= 2
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_prompt_logprobs_equal_the_engine_scores(client, tiny_model):
    ids = client_tokenize(client, "JULIET: O Romeo, Romeo")
    llm = LLM(str(tiny_model), dtype="float32", num_kv_blocks=64)
    ref = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0, prompt_logprobs=1),
                       use_tqdm=False)[0].prompt_logprobs
    expected = [None] + [ref[i][t].logprob for i, t in enumerate(ids) if i > 0]
    for prompt in (ids, "JULIET: O Romeo, Romeo"):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        choice = out.choices[0]
        # Token ids are echoed as their decoding, special tokens included.
        assert choice.text == ("JULIET: O Romeo, Romeo" if isinstance(prompt, str) else "<s>JULIET: O Romeo, Romeo")
        assert choice.finish_reason == "length" and out.usage.completion_tokens == 0
        got = choice.logprobs.token_logprobs
        assert got[0] is None and got[1:] == pytest.approx(expected[1:], abs=1e-5)
        assert len(choice.logprobs.tokens) == len(ids)
    # lm-evaluation-harness asks for one extra token and drops it.
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    assert len(out.choices[0].logprobs.token_logprobs) == len(ids) + 1


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, max_completion_tokens=6, temperature=0, n=2,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        extra_body=GREEDY_LONG)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


def test_chat_stream_role_first_usage_last(client):
    kwargs = dict(model=MODEL_NAME, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hi"}],
                  extra_body=GREEDY_LONG)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL_NAME, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=3, messages=[{"role": "user", "content": "Hi"}],
                                         extra_body=GREEDY_LONG)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0])
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_32_concurrent_streams_finish_with_the_right_counts(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        spans = []

        async def one(i: int) -> int:
            stream = await aclient.completions.create(
                model=MODEL_NAME, prompt=f"{i} ROMEO:", max_tokens=200 + i, temperature=0.8, seed=i,
                stream=True, stream_options={"include_usage": True}, extra_body=GREEDY_LONG)
            first = last = None
            async for chunk in stream:
                if chunk.choices:
                    first = first or time.monotonic()
                    last = time.monotonic()
                elif chunk.usage:
                    usage = chunk.usage.completion_tokens
            spans.append((first, last))
            return usage

        counts = await asyncio.gather(*(one(i) for i in range(32)))
        await aclient.close()
        return counts, spans

    counts, spans = asyncio.run(main())
    assert counts == [200 + i for i in range(32)]
    # They progressed together: when the first stream ended (200 steps in, far longer than
    # admitting 32 requests takes on any machine), all had started.
    first_end = min(end for _, end in spans)
    assert all(start < first_end for start, _ in spans)
