"""The fake OpenAI server (tokenmill.bench.fake_server) under the official `openai` client:
completions and chat, streaming and not, usage and the include_usage final chunk, delays."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tokenmill.bench.fake_server import TOKEN, count_words
from tokenmill.bench.gateway_bench import fake_server_process


@pytest.fixture(scope="module")
def fake():
    with fake_server_process(model="fake-model") as target:
        yield target


@pytest.fixture(scope="module")
def client(fake):
    with openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_completion(client):
    r = client.completions.create(model="fake-model", prompt="hello  big\nworld", max_tokens=5)
    assert r.object == "text_completion" and r.model == "fake-model"
    assert r.choices[0].text == TOKEN * 5 and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)


def test_completion_prompt_lists(client):
    assert client.completions.create(model="x", prompt=[1, 2, 3, 4], max_tokens=1).usage.prompt_tokens == 4
    assert client.completions.create(model="x", prompt=["a b", "c"], max_tokens=0).usage.prompt_tokens == 3


def test_chat_default_max_tokens(client):
    r = client.chat.completions.create(model="fake-model", messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == TOKEN * 16
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 16, 21)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=2)
    assert r.usage.completion_tokens == 2


def test_completion_stream_with_usage(client):
    chunks = list(client.completions.create(model="fake-model", prompt="a b", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    tokens, final = chunks[:-1], chunks[-1]
    assert [c.choices[0].text for c in tokens] == [TOKEN] * 4
    assert [c.choices[0].finish_reason for c in tokens] == [None, None, None, "length"]
    assert all(c.object == "text_completion" for c in chunks)
    assert final.choices == [] and (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 4)


def test_chat_stream(client):
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x y"}],
                                                 max_tokens=3, stream=True))
    assert len(chunks) == 3 and all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == TOKEN * 3
    assert chunks[-1].choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x y"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5


def test_models_health_metrics_request_id(client, fake):
    assert [m.id for m in client.models.list()] == ["fake-model"]
    r = httpx.get(f"{fake.base_url}/health", headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    r = httpx.post(f"{fake.base_url}/v1/completions", json={"prompt": "p"}, headers={"X-Request-Id": "q7"})
    assert r.headers["x-request-id"] == "q7" and r.json()["usage"]["completion_tokens"] == 16
    metrics = httpx.get(f"{fake.base_url}/metrics").text
    assert 'fake_server_requests_total{path="/v1/completions"}' in metrics
    assert "fake_server_completion_tokens_total" in metrics


def test_errors(client, fake):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="p", max_tokens=-1)
    r = httpx.post(f"{fake.base_url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{fake.base_url}/v1/chat/completions", json={"messages": []}).status_code == 400
    assert httpx.get(f"{fake.base_url}/v1/nope").status_code == 404
    assert httpx.get(f"{fake.base_url}/v1/completions").status_code == 405


def test_delays():
    with fake_server_process(ttft_ms=100, inter_token_ms=30) as slow, \
            openai.OpenAI(base_url=f"{slow.base_url}/v1", api_key="x", max_retries=0) as c:
        t0 = time.perf_counter()
        stream = c.completions.create(model="m", prompt="p", max_tokens=4, stream=True)
        first = next(iter(stream))
        ttft = time.perf_counter() - t0
        assert first.choices[0].text == TOKEN
        rest = list(stream)
        total = time.perf_counter() - t0
    assert len(rest) == 3 and ttft >= 0.1 and total >= 0.1 + 3 * 0.03


def test_count_words():
    assert count_words("  a b\tc\n") == 3
    assert count_words([5, 6]) == 2
    assert count_words([{"type": "text", "text": "a b"}, {"type": "image_url", "image_url": {}}]) == 2
    assert count_words(None) == 0
