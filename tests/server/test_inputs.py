"""No input reaches a 5xx: invalid Unicode, deep nesting, huge arrays and numbers, loose
types and empty prompts are 400s naming the field; vLLM's continuous usage stats; a server
without a tokenizer. The fuzz test (test_fuzz.py) covers the inputs nobody thought of."""

from __future__ import annotations

import json

import pytest
from server_harness import MODEL_NAME, running_server
from test_errors import CHAT, GOOD, assert_error, assert_still_serving


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {**GOOD, "prompt": "ROMEO \ud800"}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["ok", "\udfff"]}, "prompt[1]"),
    ("/v1/completions", {**GOOD, "stop": ["\ud800"]}, "stop[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
])
def test_lone_surrogates_are_400_naming_the_field(http, path, body, param):
    # json.dumps writes the lone surrogate as the escape "\ud800", as a hostile client would.
    content = json.dumps(body).encode()
    err = assert_error(http.post(path, content=content, headers={"content-type": "application/json"}), 400,
                       param=param)
    assert "surrogate" in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deep_nesting_is_400(http, depth):
    nested = "[" * depth + "]" * depth
    content = f'{{"model": "{MODEL_NAME}", "prompt": "a", "metadata": {nested}}}'
    err = assert_error(http.post("/v1/completions", content=content), 400)
    assert "nests deeper than 64" in err["message"]
    assert_still_serving(http)


def test_array_sizes_integers_and_numbers_are_bounded(server, http):
    # max(context, sequences the server holds): the longest token-id list or prompt batch
    limit = server.state.limits.max_json_items
    assert limit == 256 + 256
    err = assert_error(http.post("/v1/completions", json={**GOOD, "stop": ["x"] * (limit + 1)}), 400, param="stop")
    assert f"at most {limit}" in err["message"]
    assert_error(http.post("/detokenize", json={"tokens": [1] * (limit + 1)}), 400, param="tokens")
    assert_error(http.post("/v1/completions", json={**GOOD, "prompt": [1, 2**64]}), 400, param="prompt[1]")
    huge = '{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}"  # past Python's int() digit limit
    assert_error(http.post("/v1/completions", content=huge), 400)
    for value in ("NaN", "Infinity", "1e400"):
        assert_error(http.post("/v1/completions", content=f'{{"prompt": "a", "temperature": {value}}}'), 400)
    assert_still_serving(http)


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"), ("stream", 1), ("n", "2"), ("n", 1.0), ("max_tokens", "16"), ("temperature", "0.5"),
    ("echo", "true"), ("logprobs", True), ("ignore_eos", 0), ("stream_options", {"include_usage": "true"}),
])
def test_types_are_strict_as_in_openai(http, field, value):
    body = {**GOOD, field: value, **({"stream": True} if field == "stream_options" else {})}
    assert_error(http.post("/v1/completions", json=body), 400, param=field if field != "stream_options" else
                 "stream_options.include_usage")
    assert_still_serving(http)


@pytest.mark.parametrize("prompt", ["", [""], ["a", ""], [[]], [[1], []]])
def test_empty_prompts_are_400(http, prompt):
    assert_error(http.post("/v1/completions", json={**GOOD, "prompt": prompt}), 400, param="prompt")


def _events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        lines = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_continuous_usage_stats_puts_usage_in_every_chunk(http):
    body = {**GOOD, "prompt": ["ROMEO:", "To be, or not"], "n": 2, "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(http, "/v1/completions", body)
    *chunks, final = events
    prompt_lens = [len(http.post("/tokenize", json={"prompt": p}).json()["tokens"]) for p in body["prompt"]]
    seen: dict[int, int] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == prompt_lens[choice["index"] // 2]
        assert usage["completion_tokens"] >= seen.get(choice["index"], 0)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        seen[choice["index"]] = usage["completion_tokens"]
    assert seen == {0: 4, 1: 4, 2: 4, 3: 4}
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 16
    # Chat: the role chunk first (0 tokens so far); vLLM implies include_usage.
    body = {**CHAT, "max_tokens": 3, "ignore_eos": True, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    *chunks, final = _events(http, "/v1/chat/completions", body)
    assert chunks[0]["usage"]["completion_tokens"] == 0
    assert [c["usage"]["completion_tokens"] for c in chunks[1:]] == [1, 2, 3]
    assert final["usage"]["completion_tokens"] == 3
    # Without it, chunks carry usage: null, as before.
    body = {**GOOD, "stream": True, "stream_options": {"include_usage": True}}
    assert all(e["usage"] is None for e in _events(http, "/v1/completions", body)[:-1])


def test_server_without_a_tokenizer_takes_token_ids_and_refuses_text(tiny_model):
    with running_server(tiny_model, skip_tokenizer_init=True) as s, s.client() as c:
        resp = c.post("/v1/completions", json={**GOOD, "prompt": [1, 40, 41], "max_tokens": 3, "ignore_eos": True})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        for path, body, param in (
            ("/v1/completions", GOOD, "prompt"),
            ("/v1/completions", {**GOOD, "prompt": [1, 40], "logprobs": 0}, "logprobs"),
            ("/v1/completions", {**GOOD, "prompt": [1, 40], "stop": "x"}, "stop"),
            ("/v1/chat/completions", CHAT, "messages"),
            ("/tokenize", {"prompt": "a"}, "prompt"),
            ("/detokenize", {"tokens": [1]}, "tokens"),
        ):
            err = assert_error(c.post(path, json=body), 400, param=param)
            assert "--skip-tokenizer-init" in err["message"]
