"""`tokenmill serve --ray` with two engine replicas on a local two-node Ray cluster (the demo
model): the same API as `tokenmill serve`, load spread over both replicas, same-prefix
requests kept on one replica (seen in the replicas' own prefix-cache counters), client
disconnects reaching the engine, and a replica killed under load failing no request that had
not started streaming. The kill runs last: Serve replaces the replica."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import aiohttp
import httpx
import openai
import pytest

from tests.server.server_harness import CEILING_S, ServedProcess, metric_total, wait_until
from tests.services import ServiceUnavailable, prometheus_server
from tokenmill.config import DEMO_MODEL_DIR

from .harness import RayServe

ENGINE_ARGS = ("--model", DEMO_MODEL_DIR, "--served-model-name", "demo", "--dtype", "float32",
               "--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--disable-log-requests")


@pytest.fixture(scope="module")
def served(cluster):
    s = RayServe(cluster, *ENGINE_ARGS, "--num-replicas", "2")
    try:
        wait_until(lambda: len(s.replicas()) == 2, timeout=CEILING_S, interval=0.5)
        yield s
    finally:
        s.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=CEILING_S)


def _without_ids(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("id", "created")}


def test_same_api_as_tokenmill_serve(served):
    """Greedy outputs, streams, errors and model lists are the ones `tokenmill serve` gives."""
    ray_client = _client(served.url)
    with ServedProcess(DEMO_MODEL_DIR, *ENGINE_ARGS[2:], capture_log=False) as direct:
        direct_client = _client(direct.url)
        for c in (ray_client, direct_client):  # warm both: first requests are slower, not different
            c.completions.create(model="demo", prompt="warm", max_tokens=1)
        kwargs = dict(model="demo", prompt="The king said unto his lords", max_tokens=12, temperature=0, logprobs=2)
        a, b = ray_client.completions.create(**kwargs), direct_client.completions.create(**kwargs)
        assert _without_ids(a.model_dump()) == _without_ids(b.model_dump())
        chat = dict(model="demo", messages=[{"role": "user", "content": "Who rules?"}], max_tokens=10, temperature=0)
        a, b = ray_client.chat.completions.create(**chat), direct_client.chat.completions.create(**chat)
        assert _without_ids(a.model_dump()) == _without_ids(b.model_dump())

        def stream(c):
            chunks = list(c.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
            return [_without_ids(ch.model_dump()) for ch in chunks]

        assert stream(ray_client) == stream(direct_client)
        for path, body in (("/v1/completions", {"model": "demo"}),
                           ("/v1/completions", {"model": "nope", "prompt": "x"}),
                           ("/v1/chat/completions", b"{not json"),
                           ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 10**6})):
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            ra, rb = httpx.post(served.url + path, **kw), httpx.post(direct.url + path, **kw)
            assert (ra.status_code, ra.json()) == (rb.status_code, rb.json()), path
            assert 400 <= ra.status_code < 500
        models = httpx.get(served.url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [m["id"] for m in httpx.get(direct.url + "/v1/models").json()["data"]]
    r = httpx.post(served.url + "/v1/completions", headers={"x-request-id": "ray-req-1"},
                   json={"model": "demo", "prompt": "hi", "max_tokens": 1})
    assert r.headers.get_list("x-request-id") == ["ray-req-1"]  # once, the client's
    assert httpx.get(served.url + "/health").status_code == 200  # the ingress's own: no load on replicas
    assert r.headers["x-tokenmill-replica"] in served.replicas()


def test_requests_spread_over_both_replicas(served):
    before = served.per_replica("tokenmill:request_success_total", finished_reason="length")

    async def send_all():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(served.url + "/v1/completions", json={
                        "model": "demo", "prompt": f"{i} distinct prompt {random.random()}", "max_tokens": 4,
                        "ignore_eos": True}) as r:  # each ends by length, the counter read below
                    assert r.status == 200, await r.text()
                    return r.headers["x-tokenmill-replica"]
            return await asyncio.gather(*(one(i) for i in range(24)))

    answered_by = asyncio.run(send_all())
    after = served.per_replica("tokenmill:request_success_total", finished_reason="length")
    assert set(answered_by) == set(after) and len(after) == 2
    for replica in after:  # each replica's own counter saw its share
        assert after[replica] - before.get(replica, 0) == answered_by.count(replica) > 0


def test_same_prefix_requests_go_to_one_replica(served):
    """Groups of requests sharing a long prefix: each group on one replica (its x-tokenmill-replica
    and the replicas' prefix-cache hit counters), the groups over both replicas (all 12 on one
    by the hash ring: odds 1 in 2,048)."""
    rng = random.Random(7)
    words = "the king said unto his lords that the night was long and full of dread".split()
    prefixes = [" ".join(rng.choice(words) for _ in range(100)) for _ in range(12)]
    hits0 = served.per_replica("tokenmill:prefix_cache_hits_total")
    queries0 = served.per_replica("tokenmill:prefix_cache_queries_total")
    groups: dict[int, list[str]] = {}
    with httpx.Client(timeout=CEILING_S) as client:
        for round_ in range(3):
            for g, prefix in enumerate(prefixes):
                r = client.post(served.url + "/v1/completions", json={
                    "model": "demo", "prompt": f"{prefix} question {round_}?", "max_tokens": 2})
                assert r.status_code == 200, r.text
                groups.setdefault(g, []).append(r.headers["x-tokenmill-replica"])
    assert all(len(set(replicas)) == 1 for replicas in groups.values()), groups
    assert len({replicas[0] for replicas in groups.values()}) == 2, groups  # spread by the hash ring
    hits = sum(served.per_replica("tokenmill:prefix_cache_hits_total").values()) - sum(hits0.values())
    queries = sum(served.per_replica("tokenmill:prefix_cache_queries_total").values()) - sum(queries0.values())
    # Rounds 2 and 3 find their ~300-token prefix cached: 2/3 of all prompt tokens, less the
    # partial last block; scattered routing would find it about half as often.
    assert hits / queries > 0.55, (hits, queries)


def test_client_disconnect_aborts_the_request_on_its_replica(served):
    aborted0 = sum(served.per_replica("tokenmill:request_success_total", finished_reason="abort").values())
    with httpx.Client(timeout=CEILING_S) as client:
        with client.stream("POST", served.url + "/v1/completions", json={
                "model": "demo", "prompt": "Once upon a time", "max_tokens": 900, "stream": True,
                "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    wait_until(lambda: sum(served.per_replica("tokenmill:request_success_total",
                                              finished_reason="abort").values()) == aborted0 + 1,
               interval=0.2)
    assert sum(served.per_replica("tokenmill:num_requests_running").values()) == 0


def test_every_replicas_metrics_reach_prometheus(served):
    """A real Prometheus scraping the one endpoint sees each replica as its own series."""
    try:
        with prometheus_server([served.url.removeprefix("http://")], scrape_interval_s=0.5) as prom:
            def per_replica():
                r = httpx.get(prom + "/api/v1/query", params={
                    "query": "sum by (replica) (tokenmill:request_success_total)"}).json()
                assert r["status"] == "success", r
                return {s["metric"]["replica"]: float(s["value"][1]) for s in r["data"]["result"]} or None

            seen = wait_until(per_replica, interval=0.5)
    except ServiceUnavailable as e:
        pytest.skip(str(e))
    assert set(seen) == served.replicas() and len(seen) == 2
    assert seen == {r: sum(v for k, v in _by_label(served.metrics(), "tokenmill:request_success_total", r))
                    for r in seen}


def _by_label(text: str, name: str, replica: str):
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("replica") == replica:
                yield s.labels.get("finished_reason"), s.value


def test_the_bench_lab_runs_against_the_ray_endpoint(served, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "serve", "--base-url", served.url,
                          "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "4", "--ignore-eos",
                          "--num-prompts", "8", "--max-concurrency", "4", "--disable-tqdm", "--db",
                          str(tmp_path / "h.db"), "--save-result", "--result-dir", str(tmp_path),
                          "--result-filename", "r.json"], capture_output=True, text=True, timeout=CEILING_S)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 8 and result["total_output_tokens"] == 32


async def _load(served: RayServe, num_requests: int, concurrency: int, kill_after_s: float) -> list[dict]:
    """Mixed load (one request in four streamed); SIGKILL one engine replica after
    `kill_after_s`, as soon as each replica holds 2 requests or more. Returns what each
    request saw."""
    results: list[dict] = []
    todo = iter(range(num_requests))
    timeout = aiohttp.ClientTimeout(total=CEILING_S)

    async def worker(session):
        for i in todo:
            streamed = i % 4 == 0
            body = {"model": "demo", "prompt": f"request {i}: tell a long tale", "max_tokens": 40,
                    "ignore_eos": True, "stream": streamed}
            async with session.post(served.url + "/v1/completions", json=body) as r:
                if not streamed:
                    results.append({"stream": False, "status": r.status, "body": await r.text()})
                    continue
                events = []
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events.append(line[6:].strip().decode())
                results.append({"stream": True, "status": r.status, "events": events})

    async def killer():
        await asyncio.sleep(kill_after_s)
        # Kill only once every replica holds requests, so whichever one dies, requests die with
        # it (the router, not the test, decides where they sit).
        victim = served.replica_pids()[0]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            held = await asyncio.to_thread(_requests_held, served)
            if len(held) == 2 and min(held.values()) >= 2:
                break
            await asyncio.sleep(0.05)  # each read is a scrape of every replica, through the ingress
        os.kill(victim, signal.SIGKILL)
        print(f"SIGKILL to a replica; requests held per replica just before: {held}")

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(killer(), *(worker(session) for _ in range(concurrency)))
    return results


def _requests_held(served: RayServe) -> dict[str, float]:
    """Requests running or waiting on each engine replica."""
    text = served.metrics()
    return {r: metric_total(text, "tokenmill:num_requests_running", replica=r)
            + metric_total(text, "tokenmill:num_requests_waiting", replica=r) for r in served.replicas(text)}


def test_killing_a_replica_under_load_fails_no_request_that_had_not_started(served):
    before = served.replicas()
    # Calls the ingress retried on another replica, whatever error the dead one raised.
    retries0 = metric_total(served.metrics(), "tokenmill:ray_ingress_retries_total")
    results = asyncio.run(_load(served, num_requests=60, concurrency=8, kill_after_s=2.0))
    assert len(results) == 60  # nothing hung or vanished
    cut = 0
    for res in results:
        assert res["status"] == 200, res
        if not res["stream"]:
            assert json.loads(res["body"])["choices"][0]["finish_reason"] == "length"
            continue
        events = res["events"]
        assert events[-1] == "[DONE]", events  # every stream ends cleanly
        last = json.loads(events[-2])
        if "error" in last:  # cut short: only a stream that had already started
            assert last["error"]["code"] == "replica_stream_error"
            assert len(events) >= 3 and "choices" in json.loads(events[0])
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    retried = metric_total(served.metrics(), "tokenmill:ray_ingress_retries_total") - retries0
    # The replica died holding requests: those with no byte sent yet were retried elsewhere,
    # streams already under way were cut cleanly; every one answered 200 above. (Which of its
    # requests were streams is chance: 1 in 4 is, so nearly every run retries some.)
    assert retried + cut >= 1, (retried, cut)
    print(f"killed 1 of 2 replicas: {retried:g} call(s) retried, {cut} stream(s) cut")
    # Serve replaces the replica: two again, one of them new.
    def replaced():
        now = served.replicas()
        return now if len(now) == 2 and now != before else None

    after = wait_until(replaced, interval=0.5)
    assert len(after & before) == 1
    r = httpx.post(served.url + "/v1/completions", json={"model": "demo", "prompt": "still there?", "max_tokens": 2})
    assert r.status_code == 200
