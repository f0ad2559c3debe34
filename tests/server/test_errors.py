"""Raw HTTP: every error case returns its status and an OpenAI error body, and the server
keeps answering good requests after each one."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing

import httpx
import pytest
from server_harness import CEILING_S, MODEL_NAME, running_server, wait_until

from tokenmill.engine.async_llm import EngineDeadError
from tokenmill.server.args import ServerSettings

GOOD = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_still_serving(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json=GOOD)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_malformed_json_is_400_not_422(http):
    for body in (b"{not json", b"", b"[1, 2]", b"\xff\xfe"):
        err = assert_error(http.post("/v1/completions", content=body), 400)
        assert "JSON" in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": MODEL_NAME}, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {**GOOD, "prompt": ["a", [1, 2]]}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, "prompt"),
    ("/v1/completions", {**GOOD, "temperature": -1}, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -5}, "top_k"),
    ("/v1/completions", {**GOOD, "n": 0}, "n"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {**GOOD, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "min_tokens": 5}, "min_tokens"),
    ("/v1/completions", {**GOOD, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**GOOD, "stop": [""]}, "stop"),
    ("/v1/completions", {**GOOD, "prompt": [1, 2, 100000]}, "prompt"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**GOOD, "seed": 2**70}, "seed"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs"),
])
def test_invalid_parameters_are_400_naming_the_parameter(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param=param)
    assert_still_serving(http)


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "logit_bias", {"5": 10}),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "guided_decoding_backend", "xgrammar"),
    ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "logit_bias", {"5": 10}),
])
def test_unsupported_features_are_400_never_ignored(http, path, field, value):
    body = {**(CHAT if "chat" in path else GOOD), field: value}
    err = assert_error(http.post(path, json=body), 400, param=field, code="unsupported_parameter")
    assert "not supported" in err["message"]
    assert_still_serving(http)


def test_harmless_values_of_unsupported_fields_are_accepted(http):
    body = {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {},
            "store": False, "metadata": {"a": "b"}, "some_vendor_field": 1}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_null_optional_fields_mean_the_default(http):
    nulls = {k: None for k in ("n", "temperature", "top_p", "stop", "seed", "stream", "logprobs", "echo",
                               "ignore_eos", "min_tokens", "user", "stream_options", "presence_penalty")}
    resp = http.post("/v1/completions", json={**GOOD, **nulls})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 1
    resp = http.post("/v1/chat/completions", json={**CHAT, **nulls, "echo": None, "logprobs": None,
                                                    "top_logprobs": None, "max_completion_tokens": None})
    assert resp.status_code == 200


def test_non_text_content_parts_are_400(http):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="messages[0].content[1].type")
    assert_still_serving(http)


def test_context_length_is_checked_with_the_numbers(http):
    prompt = [1] + [40] * 99  # 100 tokens; the tiny model's context is 256
    err = assert_error(http.post("/v1/completions", json={**GOOD, "prompt": prompt, "max_tokens": 200}), 400,
                       param="max_tokens", code="context_length_exceeded")
    assert "256" in err["message"] and "300" in err["message"] and "100 in the prompt" in err["message"]
    err = assert_error(http.post("/v1/completions", json={**GOOD, "prompt": [40] * 300}), 400,
                       param="prompt", code="context_length_exceeded")
    assert "300" in err["message"]
    body = {**CHAT, "max_completion_tokens": 1000}
    err = assert_error(http.post("/v1/chat/completions", json=body), 400, param="max_completion_tokens",
                       code="context_length_exceeded")
    assert "in the messages" in err["message"]
    # Without max_tokens, chat gets the room that is left.
    resp = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": None, "ignore_eos": True})
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 256
    assert_still_serving(http)


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/completions", json={**GOOD, "model": "gpt-4"}), 404, param="model",
                 code="model_not_found")
    assert_error(http.get("/v1/models/gpt-4"), 404, code="model_not_found")
    assert_still_serving(http)


def test_unknown_path_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_still_serving(http)


def test_internal_error_is_500_without_traceback_and_logged(server, http, monkeypatch, caplog):
    def boom(*_):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.state.tokenization, "models", boom)
    with caplog.at_level(logging.ERROR, logger="tokenmill.server"):
        resp = http.get("/v1/models", headers={"X-Request-Id": "trace-me-42"})
    err = assert_error(resp, 500)
    assert "secret" not in resp.text and "trace-me-42" in err["message"]
    assert resp.headers["x-request-id"] == "trace-me-42"
    assert any("trace-me-42" in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert http.get("/v1/models").status_code == 200
    assert_still_serving(http)


@pytest.mark.parametrize(("error", "code"), [
    (EngineDeadError("engine thread gone"), "engine_dead"),
    (RuntimeError("secret internals"), "internal_error"),
])
def test_error_after_the_stream_started_is_one_event_then_done(server, http, monkeypatch, error, code):
    real_generate = server.state.engine.generate

    async def fail_after_first_output(*args, **kwargs):
        async with aclosing(real_generate(*args, **kwargs)) as stream:
            async for out in stream:
                yield out
                raise error

    monkeypatch.setattr(server.state.engine, "generate", fail_after_first_output)
    body = {**GOOD, "max_tokens": 8, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200  # sent before the error happened
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert list(first) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    err = json.loads(events[-2])["error"]
    assert err["code"] == code and "secret" not in err["message"]
    monkeypatch.undo()
    wait_until(lambda: server.state.admission.num_inflight_seqs == 0 and server.state.engine.num_unfinished == 0)
    assert_still_serving(http)


def test_health_version_and_draining(server, http):
    assert http.get("/health").status_code == 200
    version = http.get("/version").json()
    assert version["name"] == "tokenmill" and version["config"]["max_model_len"] == 256
    assert "/" not in json.dumps(version)  # the model's directory name, no filesystem path
    server.state.drain.is_draining = True
    try:
        assert_error(http.post("/v1/completions", json=GOOD), 503, code="shutting_down")
        assert http.get("/health").status_code == 503
    finally:
        server.state.drain.is_draining = False
    assert_still_serving(http)


def test_tokenize_detokenize(http):
    ids = http.post("/tokenize", json={"prompt": "ROMEO: hi"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "<s>ROMEO: hi"
    chat = http.post("/tokenize", json={"messages": CHAT["messages"]}).json()
    prompt_tokens = http.post("/v1/chat/completions", json=CHAT).json()["usage"]["prompt_tokens"]
    assert chat["count"] == prompt_tokens
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400, param="tokens")
    assert_error(http.post("/tokenize", json={}), 400)


# ---- API key and overload: a second server with a key and a tiny queue ----------------------

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def strict_server(tiny_model):
    settings = ServerSettings(served_model_names=(MODEL_NAME, "alias"), api_key=KEY, max_waiting_requests=2)
    with running_server(tiny_model, settings, max_num_seqs=2) as s:
        yield s


def test_api_key(strict_server):
    with strict_server.client() as c:
        assert_error(c.post("/v1/completions", json=GOOD), 401, code="invalid_api_key")
        assert_error(c.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.post("/tokenize", json={"prompt": "a"}), 401)
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        # /version is public, the deployment's settings are not.
        assert set(c.get("/version").json()) == {"version", "name"}
        assert set(c.get("/version", headers={"Authorization": "Bearer nope"}).json()) == {"version", "name"}
        config = c.get("/version", headers={"Authorization": f"Bearer {KEY}"}).json()["config"]
        assert config["max_num_seqs"] == 2 and "/" not in config["model"]
        ok = c.post("/v1/completions", json={**GOOD, "model": "alias"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["model"] == MODEL_NAME


def test_overload_is_503_with_retry_after_and_no_pile_up(strict_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {**GOOD, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=strict_server.url, headers=headers, timeout=CEILING_S) as c:
            async def one():
                async with c.stream("POST", "/v1/completions", json=long) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        return resp
                    await resp.aiter_lines().__anext__()  # running; then hang up
                    return resp

            return await asyncio.gather(*(one() for _ in range(10)))

    responses = asyncio.run(main())
    refused = [r for r in responses if r.status_code == 503]
    # 2 running + 2 waiting at most; the rest refused with a retryable error.
    assert len(responses) - len(refused) <= 4 and refused
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert_error(r, 503, code="engine_overloaded")
    with strict_server.client(headers=headers) as c:
        assert_still_serving(c)
        # More sequences than running batch + queue could ever hold: 400, not a retry loop.
        assert_error(c.post("/v1/completions", json={**GOOD, "n": 5}), 400, param="n")

