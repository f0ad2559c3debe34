"""Limits a client cannot exceed: body bytes (413 before the body is read or parsed), prompt
characters (400 before tokenizing), and tokenization that neither blocks other requests
nor runs for a client that has left."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from server_harness import CEILING_S, MODEL_NAME, running_server, wait_until
from test_errors import GOOD, assert_error, assert_still_serving

from tokenmill.server.args import ServerSettings
from tokenmill.server.limits import MIN_BODY_BYTES
from tokenmill.server.prompt_encoder import LONG_ENCODE_CHARS

# Text for the long tokenizations: several seconds of tokenizer work on a 2-core machine,
# thousands of times what a short prompt needs, so their order cannot depend on its speed.
LONG_TEXT_CHARS = 3_000_000
BODY_LIMIT = 4 * LONG_TEXT_CHARS


@pytest.fixture(scope="module")
def server(tiny_model):
    settings = ServerSettings(served_model_names=(MODEL_NAME,), max_request_body_bytes=BODY_LIMIT)
    with running_server(tiny_model, settings) as s:
        yield s


def test_default_body_limit_is_sized_from_the_context(tiny_model):
    with running_server(tiny_model) as s:  # max_model_len 256: the 1 MiB floor
        assert s.state.limits.max_body_bytes == MIN_BODY_BYTES
        with s.client() as c:
            err = assert_error(c.post("/v1/completions", json={**GOOD, "prompt": "a" * MIN_BODY_BYTES}), 413,
                               code="request_too_large")
            assert str(MIN_BODY_BYTES) in err["message"]
            assert_still_serving(c)


def test_oversized_body_is_413_before_it_is_read(server, http):
    body = b'{"prompt": "' + b"a" * (BODY_LIMIT + 1) + b'"}'
    start = time.monotonic()
    err = assert_error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
                       413, code="request_too_large")
    assert f"has {len(body)} bytes" in err["message"]
    # Answered from Content-Length: nothing was parsed or tokenized (that took minutes).
    assert time.monotonic() - start < 30
    assert server.state.encoder.num_encodes == {"short": 0, "long": 0}
    assert_still_serving(http)


def test_oversized_body_without_content_length_is_413_while_reading(server, http):
    def chunks():
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b" " * 65536

    assert_error(http.post("/v1/completions", content=chunks()), 413, code="request_too_large")
    assert server.state.encoder.num_encodes == {"short": 0, "long": 0}
    assert_still_serving(http)


def test_openai_client_gets_413_for_a_huge_prompt(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL_NAME, prompt="a" * (BODY_LIMIT + 1), max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_too_long_for_any_tokenization_is_400_before_tokenizing(server, http, path):
    limit = server.state.limits.max_prompt_chars
    text = "a" * (limit + 1)
    body = {**GOOD, "prompt": text} if "chat" not in path else {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": text}]}
    before = dict(server.state.encoder.num_encodes)
    err = assert_error(http.post(path, json=body), 400, code="context_length_exceeded",
                       param="prompt" if "chat" not in path else "messages")
    assert "characters" in err["message"]
    assert server.state.encoder.num_encodes == before
    # One character less is tokenized and then measured in tokens.
    err = assert_error(http.post("/v1/completions", json={**GOOD, "prompt": text[:limit]}), 400,
                       code="context_length_exceeded")
    assert "tokens" in err["message"]
    assert_still_serving(http)


def _post_in_thread(url: str, path: str, body: dict, timeout: float = CEILING_S) -> dict:
    """POST from a thread; the returned dict fills in with the response and its end time."""
    out: dict = {}

    def run():
        try:
            out["response"] = httpx.post(url + path, json=body, timeout=timeout)
        except httpx.HTTPError as e:
            out["error"] = e
        out["done_at"] = time.monotonic()

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_a_long_tokenization_blocks_no_other_request(server, http):
    encodes = server.state.encoder.num_encodes
    before = dict(encodes)
    long = _post_in_thread(server.url, "/tokenize", {"prompt": "ROMEO: " * (LONG_TEXT_CHARS // 7)})
    wait_until(lambda: encodes["long"] > before["long"])
    # Meanwhile prompts of every other size are tokenized and served.
    medium = "JULIET: " * (LONG_ENCODE_CHARS // 16)
    for body in ({**GOOD, "prompt": "ROMEO: " * 20}, {"prompt": medium}):
        resp = http.post("/tokenize" if "model" not in body else "/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert "done_at" not in long
    long["thread"].join()
    assert long["response"].status_code == 200
    assert long["response"].json()["count"] > LONG_TEXT_CHARS // 7


def test_a_queued_tokenization_is_dropped_when_its_client_leaves(server):
    encodes = server.state.encoder.num_encodes
    before = encodes["long"]
    body = {"prompt": "ROMEO: " * (LONG_TEXT_CHARS // 7)}
    first = _post_in_thread(server.url, "/tokenize", body)
    wait_until(lambda: encodes["long"] == before + 1)
    # A second one queues behind the first; its client gives up while it waits.
    gone = _post_in_thread(server.url, "/tokenize", body, timeout=0.5)
    gone["thread"].join()
    assert isinstance(gone["error"], httpx.ReadTimeout) and "done_at" not in first
    first["thread"].join()
    assert first["response"].status_code == 200
    # The worker would have taken the second encode the moment the first one ended.
    time.sleep(0.5)
    assert encodes["long"] == before + 1
