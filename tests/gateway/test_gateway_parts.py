"""The gateway's pure parts: keys and their store (SQLite and a real PostgreSQL), the circuit
breaker, token estimates, the SSE relay, configuration errors."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from tokenmill.gateway.accounting import SseRelay, Usage, estimate, routing_text
from tokenmill.gateway.backends import CLOSED, HALF_OPEN, OPEN, Backend, BackendConfig
from tokenmill.gateway.config import build_config, load_file
from tokenmill.gateway.keys import KeyLimits, create_record, parse_duration_s, rotated, split_key
from tokenmill.gateway.store import KeyStore, StoreError
from tokenmill.server.errors import APIError


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = str(tmp_path / "keys.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = KeyStore(url)
    if request.param == "postgresql":  # a clean slate in the session's shared database
        s._execute("DELETE FROM gateway_keys")
        s._execute("DELETE FROM gateway_spend")
    yield s
    s.close()


def test_keys_are_stored_as_salted_hashes_and_round_trip(store):
    limits = KeyLimits(rpm_limit=5, model_tpm_limit={"m": 100}, max_budget=2.5, budget_duration="monthly")
    record, key = create_record(key_alias="team-a", models=("m",), metadata={"team": "a"}, limits=limits)
    store.insert(record)
    key_id, secret = split_key(key)
    got = store.get(key_id)
    assert got == record and got.matches(secret, time.time())
    assert not got.matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), time.time())
    dumped = json.dumps(got.public())
    assert secret not in dumped and record.secret_hash not in dumped
    other, other_key = create_record()
    store.insert(other)
    assert other.salt != record.salt  # same secret would hash differently: salted per key
    assert [r.key_id for r in store.list()] == [key_id, other.key_id]
    store.replace(replace(got, revoked_at=123.0))
    assert store.get(key_id).problem(time.time()) == "has been revoked"
    assert store.get("000000000000") is None


def test_spend_increments_add_up_across_writers(store):
    store.add_spend([("k", "total", 10, 0.5), ("k", "d2026-12-02", 10, 0.5)])
    store.add_spend([("k", "total", 5, 0.25)])
    assert store.spend("k", "total") == (15, 0.75)
    assert store.spend("k", "d2026-12-02") == (10, 0.5)
    assert store.spend("nobody", "total") == (0, 0.0)


def test_rotation_keeps_the_old_secret_only_for_the_grace_period():
    record, key = create_record()
    old_secret = split_key(key)[1]
    new, new_key = rotated(record, grace_s=60)
    now = time.time()
    assert new.key_id == record.key_id and new.matches(split_key(new_key)[1], now)
    assert new.matches(old_secret, now) and not new.matches(old_secret, now + 61)
    assert not rotated(record, grace_s=0)[0].matches(old_secret, now)


def test_bad_keys_and_stores_are_refused_clearly(tmp_path):
    assert split_key("sk-tm-xyz-abc") is None and split_key("Bearer sk") is None
    with pytest.raises(ValueError, match="budget_duration must be one of"):
        KeyLimits(budget_duration="weekly")
    with pytest.raises(ValueError, match="rpm_limit must be a whole number"):
        KeyLimits(rpm_limit=-3)
    assert parse_duration_s("30d") == 30 * 86400 and parse_duration_s("90m") == 5400
    with pytest.raises(ValueError, match="cannot read 'soon' as a duration"):
        parse_duration_s("soon")
    with pytest.raises(StoreError, match="cannot connect to the key database"):
        KeyStore("postgresql://nobody@127.0.0.1:1/none")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="dir.db"):
        KeyStore(str(tmp_path / "dir.db"))


def test_circuit_breaker_opens_probes_half_open_and_closes():
    b = Backend(BackendConfig("http://x"), healthy=True)
    for _ in range(2):
        b.on_failure(now=100.0, reason="boom", max_fails=3)
    assert b.state == CLOSED and b.available(100.0, cooldown_s=10)
    b.on_failure(now=100.0, reason="boom", max_fails=3)
    assert b.state == OPEN and not b.available(105.0, cooldown_s=10)
    assert b.available(110.0, cooldown_s=10) and b.state == HALF_OPEN  # one probe may go
    b.probing = True
    assert not b.available(110.5, cooldown_s=10)  # ... and only one
    b.on_failure(now=111.0, reason="still down", max_fails=3)
    assert b.state == OPEN and b.opened_at == 111.0  # a failed probe opens it again
    assert b.available(121.0, cooldown_s=10)
    b.on_success()
    assert b.state == CLOSED and b.fails == 0 and not b.probing
    b.healthy = False  # the active check failing takes it out whatever the circuit says
    assert not b.available(200.0, cooldown_s=10)


def test_the_prompt_estimate_is_an_upper_bound_of_byte_level_bpe():
    from tokenizers import Tokenizer

    from tokenmill.config import DEMO_MODEL_DIR

    tok = Tokenizer.from_file(f"{DEMO_MODEL_DIR}/tokenizer.json")  # a real byte-level BPE
    for text in ("To be, or not to be", "ünïcødé ✓ 🚀 " * 5, "x" * 500, ""):
        est = estimate({"prompt": text, "max_tokens": 7}, chat=False, default_max_tokens=99)
        assert est.prompt_tokens >= len(tok.encode(text).ids) and est.completion_tokens == 7
    ids = estimate({"prompt": [5, 6, 7], "n": 2, "max_tokens": 4}, chat=False, default_max_tokens=99)
    assert (ids.prompt_tokens, ids.completion_tokens) == (3, 8)  # token ids are exact; n multiplies
    batch = estimate({"prompt": ["a", "bb", [1, 2]], "n": 2, "max_tokens": 4}, chat=False, default_max_tokens=99)
    assert batch.completion_tokens == 3 * 2 * 4 and batch.prompt_tokens == 3 + 4 + 2  # every prompt generates
    assert estimate({"prompt": "x"}, chat=False, default_max_tokens=99).max_tokens == 16  # OpenAI's default
    ignored = estimate({"prompt": "x", "max_completion_tokens": 1}, chat=False, default_max_tokens=99)
    assert ignored.max_tokens == 16 and not ignored.max_tokens_given  # completions ignore that field
    chat = estimate({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": None},
                    chat=True, default_max_tokens=99)
    assert chat.completion_tokens == 99 and not chat.max_tokens_given
    calls = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "lookup", "arguments": '{"q": "' + "z" * 300 + '"}'}}]}
    with_calls = estimate({"messages": [calls], "max_tokens": 1}, chat=True, default_max_tokens=99)
    assert with_calls.prompt_tokens > 300  # tool calls' text counts
    for bad, match in (({"prompt": "x", "max_tokens": "9"}, "max_tokens"), ({"max_tokens": 1}, "prompt"),
                       ({"prompt": "x", "n": 0}, "'n'"), ({"prompt": "x", "best_of": 1.5}, "best_of"),
                       ({"prompt": {"a": 1}}, "prompt")):
        with pytest.raises(APIError, match=match):
            estimate(bad, chat=False, default_max_tokens=99)
    assert routing_text({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
                        chat=True).startswith("system\x1fS")


def test_sse_relay_cuts_whole_events_counts_chunks_and_drops_the_usage_chunk():
    chunk = b'data: {"choices":[{"index":0,"text":"a"}],"usage":null}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    stream = chunk * 2 + usage + b"data: [DONE]\n\n"
    relay = SseRelay(drop_usage_chunk=True)
    out = b"".join(relay.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + relay.rest()
    assert out == chunk * 2 + b"data: [DONE]\n\n"
    assert relay.chunks == 2 and relay.usage == Usage(3, 2)
    keep = SseRelay(drop_usage_chunk=False)
    assert keep.feed(stream) == stream and keep.usage == Usage(3, 2)
    crlf, crlf_stream = SseRelay(drop_usage_chunk=True), stream.replace(b"\n\n", b"\r\n\r\n")
    out = b"".join(crlf.feed(crlf_stream[i:i + 5]) for i in range(0, len(crlf_stream), 5)) + crlf.rest()
    assert crlf.chunks == 2 and crlf.usage == Usage(3, 2)  # servers that end events with \r\n\r\n
    assert out.count(b"data: {") == 2 and out.endswith(b"data: [DONE]\n\n")


def test_config_files_are_checked_and_name_the_problem(tmp_path):
    good = tmp_path / "gw.toml"
    good.write_text('db = "x.db"\n[[backends]]\nurl = "http://a:1"\nweight = 2\n'
                    '[models.m]\ninput_usd_per_1m = 1.5\nrpm = 10\n[routing]\npolicy = "least_requests"\n')
    config = build_config(**load_file(good))
    assert config.backends[0].weight == 2 and config.policy("m").rpm == 10
    assert config.routing.policy == "least_requests" and config.policy("other").rpm is None
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.m]\nprice = 1\n')
    with pytest.raises(ValueError, match=r"bad.toml \[models.'m'\]: unknown key\(s\) price"):
        load_file(bad)
    bad.write_text("nonsense = ")
    with pytest.raises(ValueError, match="bad.toml"):
        load_file(bad)
    with pytest.raises(ValueError, match="at least one backend"):
        build_config()
    with pytest.raises(ValueError, match="give its URL"):
        BackendConfig.parse("localhost:8000")
    assert BackendConfig.parse("http://h:1/v1/=3") == BackendConfig("http://h:1", 3.0)
