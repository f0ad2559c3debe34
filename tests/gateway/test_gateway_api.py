"""The gateway's API through the official openai client and raw HTTP, in front of a real fake
backend process: proxying, keys, errors, limits' 429s and headers, usage in streams,
disconnects, the admin API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.gateway.harness import ADMIN_KEY, admin, create_key, fake_backend, gateway
from tests.server.server_harness import metric, wait_until


@pytest.fixture(scope="module")
def backend():
    with fake_backend("--inter-token-ms", "2") as b:
        yield b


@pytest.fixture(scope="module")
def gw(backend, tmp_path_factory):
    with gateway([backend.url], tmp_path_factory.mktemp("gw") / "keys.db") as g:
        yield g


def client(gw, key: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kwargs)


def test_completions_and_chat_are_relayed_unchanged(gw, backend):
    key = create_key(gw.url, key_alias="relay")
    direct = openai.OpenAI(base_url=backend.url + "/v1", api_key="x")
    c = client(gw, key)
    got = c.completions.create(model="fake", prompt="one two three", max_tokens=5)
    want = direct.completions.create(model="fake", prompt="one two three", max_tokens=5)
    assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
    chat = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content == " ok" * 4 and chat.usage.completion_tokens == 4
    assert [m.id for m in c.models.list().data] == ["fake"]


def test_streams_relay_every_chunk_and_usage_only_when_asked(gw):
    c = client(gw, create_key(gw.url))
    chunks = list(c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == " ok" * 6
    assert all(ch.choices for ch in chunks)  # the usage chunk the gateway asked for is not passed on
    asked = list(c.completions.create(model="fake", prompt="a b", max_tokens=3, stream=True,
                                      stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 3


def test_request_ids_are_propagated_and_logged(gw):
    key = create_key(gw.url)
    r = httpx.post(gw.url + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1},
                   headers={"Authorization": f"Bearer {key}", "X-Request-Id": "trace-123"})
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["trace-123"]  # once
    line = wait_until(lambda: next((json.loads(s) for s in gw.log().splitlines() if '"trace-123"' in s), None))
    assert line["status"] == 200 and line["backend"].startswith("http://") and line["completion_tokens"] == 1
    assert line["added_ms"] is not None and line["added_ms"] >= 0


def test_bad_keys_and_requests_get_openai_errors(gw):
    body = {"model": "fake", "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer sk-tm-000000000000-" + "a" * 43}, {"Authorization": "Bearer nope"}):
        r = httpx.post(gw.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    key = create_key(gw.url, models=["other-model"])
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model"):
        client(gw, key).completions.create(model="fake", prompt="x", max_tokens=1)
    assert client(gw, key).models.list().data == []  # /v1/models shows only what the key may use
    good = create_key(gw.url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(gw, good).completions.create(model="gpt-404", prompt="x", max_tokens=1)
    r = httpx.post(gw.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {good}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(gw, good).completions.create(model="fake", prompt="x", max_tokens=-1)


def test_revocation_expiry_and_rotation(gw):
    key = create_key(gw.url, key_alias="rotating")
    c = client(gw, key)
    c.completions.create(model="fake", prompt="x", max_tokens=1)
    key_id = key.split("-")[2]
    rotated = admin(gw.url, "POST", "/key/regenerate", json={"key_id": key_id, "grace_period": "1h"}).json()["key"]
    client(gw, rotated).completions.create(model="fake", prompt="x", max_tokens=1)
    c.completions.create(model="fake", prompt="x", max_tokens=1)  # the old secret, within its grace period
    again = admin(gw.url, "POST", "/key/regenerate", json={"key_id": key_id}).json()["key"]
    for old in (key, rotated):  # no grace: the previous secrets stop at once
        with pytest.raises(openai.AuthenticationError):
            client(gw, old).completions.create(model="fake", prompt="x", max_tokens=1)
    # LiteLLM's form: the key itself (here its latest secret) in `keys`.
    assert admin(gw.url, "POST", "/key/delete", json={"keys": [again]}).json() == {"deleted_keys": [key_id]}
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client(gw, again).completions.create(model="fake", prompt="x", max_tokens=1)
    short = create_key(gw.url, duration="1s")
    time.sleep(1.1)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client(gw, short).completions.create(model="fake", prompt="x", max_tokens=1)
    listed = admin(gw.url, "GET", "/key/list").json()["keys"]
    mine = next(k for k in listed if k["key_id"] == key_id)
    assert mine["revoked_at"] and "secret_hash" not in mine and "salt" not in mine


def test_limits_answer_429_with_retry_after_and_openai_headers(gw):
    key = create_key(gw.url, rpm_limit=2, tpm_limit=10_000)
    raw = client(gw, key).completions.with_raw_response.create(model="fake", prompt="x", max_tokens=1)
    assert raw.headers["x-ratelimit-limit-requests"] == "2" and raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    client(gw, key).completions.create(model="fake", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client(gw, key).completions.create(model="fake", prompt="x", max_tokens=1)
    assert e.value.code == "rate_limit_exceeded" and 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    budget = create_key(gw.url, max_budget_tokens=50)
    client(gw, budget).completions.create(model="fake", prompt="a b c", max_tokens=20)
    with pytest.raises(openai.RateLimitError) as e:
        client(gw, budget).completions.create(model="fake", prompt="a b c", max_tokens=40)
    assert e.value.code == "insufficient_quota"
    text = httpx.get(gw.url + "/metrics").text
    assert metric(text, "tokenmill:gateway_rate_limited_requests_total", limit="requests") >= 1
    assert metric(text, "tokenmill:gateway_rate_limited_requests_total", limit="budget_tokens") >= 1


def test_spend_is_priced_stored_and_reported(backend, tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('[models.fake]\ninput_usd_per_1m = 1000.0\noutput_usd_per_1m = 2000.0\n')
    with gateway([backend.url], tmp_path / "keys.db", "--config", str(config)) as g:
        key = create_key(g.url, key_alias="priced", max_budget=1.0, budget_duration="daily")
        r = client(g, key).completions.create(model="fake", prompt="one two", max_tokens=10)
        assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 10
        want_usd = (2 * 1000 + 10 * 2000) / 1e6
        info = wait_until(lambda: (i := admin(g.url, "GET", "/key/info",
                                             params={"key_id": key.split("-")[2]}).json())["spend"]["total"]["tokens"]
                          and i)
        assert info["spend"]["total"] == {"tokens": 12, "usd": pytest.approx(want_usd)}
        assert info["spend"]["period"]["name"].startswith("d") and info["spend"]["period"]["tokens"] == 12
        text = httpx.get(g.url + "/metrics").text
        assert metric(text, "tokenmill:gateway_spend_usd_total", key="priced") == pytest.approx(want_usd)
        assert metric(text, "tokenmill:gateway_remaining_budget_usd", key="priced") == pytest.approx(1 - want_usd)
    # A restarted gateway continues from the stored spend.
    with gateway([backend.url], tmp_path / "keys.db", "--config", str(config)) as g:
        c = client(g, key)
        spent = want_usd
        while spent + want_usd <= 1.0 + 1e-9:
            c.completions.create(model="fake", prompt="one two", max_tokens=10)
            spent += want_usd
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="fake", prompt="one two", max_tokens=10)


def test_a_client_that_leaves_mid_stream_cancels_the_backend_stream(backend, gw):
    key = create_key(gw.url)
    before = metric(httpx.get(backend.url + "/metrics").text, "fake_server_streams_cancelled_total")
    with httpx.stream("POST", gw.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "fake", "prompt": "x", "max_tokens": 5000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # streaming has started; now leave
    wait_until(lambda: metric(httpx.get(backend.url + "/metrics").text,
                              "fake_server_streams_cancelled_total") == before + 1, timeout=10)
    # Charged for what was streamed, not the 5000 reserved.
    line = wait_until(lambda: next((json.loads(s) for s in gw.log().splitlines()
                                    if '"status": 499' in s), None), timeout=10)
    assert 0 < line["completion_tokens"] < 5000


def test_the_admin_api_needs_the_admin_key(gw):
    assert httpx.get(gw.url + "/key/list").status_code == 401
    assert httpx.get(gw.url + "/key/list", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = admin(gw.url, "POST", "/key/generate", json={"rpm_limit": -1})
    assert r.status_code == 400 and "rpm_limit" in r.json()["error"]["message"]
    r = admin(gw.url, "POST", "/key/generate", json={"budget_duration": "weekly"})
    assert r.status_code == 400 and "budget_duration" in r.json()["error"]["message"]


def test_keys_cli(gw):
    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "tokenmill", "gateway", "keys", "--url", gw.url,
                              "--admin-key", ADMIN_KEY, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr + out.stdout
        return json.loads(out.stdout)

    made = cli("create", "--alias", "cli", "--rpm", "7", "--team", "search", "--models", "fake")
    assert made["key"].startswith("sk-tm-") and made["rpm_limit"] == 7 and made["metadata"] == {"team": "search"}
    assert cli("update", made["key_id"], "--rpm", "9")["rpm_limit"] == 9
    assert cli("info", made["key_id"])["spend"]["total"]["tokens"] == 0
    assert any(k["key_id"] == made["key_id"] for k in cli("list")["keys"])
    assert cli("rotate", made["key_id"])["key"] != made["key"]
    assert cli("revoke", made["key_id"]) == {"deleted_keys": [made["key_id"]]}


def test_model_limits_hold_across_keys(backend, tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text("[models.fake]\nrpm = 3\n")
    with gateway([backend.url], tmp_path / "keys.db", "--config", str(config)) as g:
        a, b = client(g, create_key(g.url)), client(g, create_key(g.url))
        for c in (a, b, a):
            c.completions.create(model="fake", prompt="x", max_tokens=1)
        with pytest.raises(openai.RateLimitError, match=r"\(model\)"):
            b.completions.create(model="fake", prompt="x", max_tokens=1)


def test_session_affinity_by_header_or_user(tmp_path):
    with fake_backend() as f1, fake_backend() as f2, fake_backend() as f3:
        fakes = (f1, f2, f3)

        def counts():
            return [metric(httpx.get(f.url + "/metrics").text, "fake_server_requests_total",
                           path="/v1/completions") for f in fakes]

        with gateway([f.url for f in fakes], tmp_path / "keys.db") as g:
            key = create_key(g.url)
            for session in ("alice", "bob", "carol"):
                before = counts()
                for i in range(6):  # different prompts, one session
                    r = httpx.post(g.url + "/v1/completions", headers={"Authorization": f"Bearer {key}",
                                                                       "X-Session-Id": session},
                                   json={"model": "fake", "prompt": f"{i} unrelated {i * 7919}", "max_tokens": 1})
                    assert r.status_code == 200
                assert sorted(x - y for x, y in zip(counts(), before)) == [0, 0, 6], session
            before = counts()
            c = client(g, key)
            for i in range(6):
                c.completions.create(model="fake", prompt=f"{i} other {i * 31}", max_tokens=1, user="dave")
            assert sorted(x - y for x, y in zip(counts(), before)) == [0, 0, 6]


def test_request_ids_and_trace_context_reach_the_backend(tmp_path):
    """A backend that records what it receives (the fake server's app, on a real port)."""
    import threading

    import uvicorn

    from tests.server.server_harness import free_port
    from tokenmill.bench.fake_server import build_fake_app

    app, seen = build_fake_app(), []

    async def recording(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            seen.append(dict(scope["headers"]))
        await app(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(recording, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        with gateway([f"http://127.0.0.1:{port}"], tmp_path / "keys.db") as g:
            key = create_key(g.url)
            parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            r = httpx.post(g.url + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1},
                           headers={"Authorization": f"Bearer {key}", "X-Request-Id": "req-42",
                                    "traceparent": parent})
            assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
            got = seen[-1]
            assert got[b"x-request-id"] == b"req-42" and got[b"traceparent"] == parent.encode()
            assert b"authorization" not in got  # the client's key stays at the gateway
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_no_route_around_the_metering(gw):
    """A trailing slash is the same route (metered, not passed through); pass-through
    routes still check the key's models; replicas' redirects are not followed."""
    key = create_key(gw.url, rpm_limit=1, models=["fake"])
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "fake", "prompt": "x", "max_tokens": 1}
    assert httpx.post(gw.url + "/v1/completions/", json=body, headers=headers).status_code == 200
    r = httpx.post(gw.url + "/v1/completions", json=body, headers=headers)
    assert r.status_code == 429  # the slash-suffixed request counted
    r = httpx.post(gw.url + "/v1/embeddings", json={"model": "other", "input": "x"}, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_defaults_follow_openai(gw):
    """/v1/completions without max_tokens means 16 tokens (OpenAI's default), so a small
    budget admits it; /v1/models/{id}; every response carries a request id."""
    key = create_key(gw.url, max_budget_tokens=40)
    r = client(gw, key).completions.create(model="fake", prompt="one two")
    assert r.usage.completion_tokens == 16
    assert client(gw, key).models.retrieve("fake").id == "fake"
    with pytest.raises(openai.NotFoundError):
        client(gw, key).models.retrieve("nope")
    assert httpx.get(gw.url + "/health").headers["x-request-id"]
    assert httpx.get(gw.url + "/nowhere").headers["x-request-id"]
