"""The gateway in front of three real `tokenmill serve` processes on the demo model:
prefix-aware routing raises the backends' own prefix-cache hit rate over least-requests
without overloading any backend, and killing a backend under load fails no request that
had not started streaming."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import aiohttp
import httpx
import pytest

from tests.gateway.harness import create_key, gateway, tokenmill_backend
from tests.server.server_harness import metric, metric_total
from tokenmill.config import DEMO_MODEL_DIR

BACKEND_ARGS = ("--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--disable-log-requests")


@pytest.fixture(scope="module")
def backends():
    started = []
    try:
        for _ in range(3):
            started.append(tokenmill_backend(DEMO_MODEL_DIR, *BACKEND_ARGS))
        yield started
    finally:
        for b in started:
            b.stop()


def _prefix_counters(backends) -> tuple[float, float]:
    hits = queries = 0.0
    for b in backends:
        text = httpx.get(b.url + "/metrics").text
        hits += metric(text, "tokenmill:prefix_cache_hits_total")
        queries += metric(text, "tokenmill:prefix_cache_queries_total")
    return hits, queries


async def _send_all(url: str, key: str, prompts: list[str], concurrency: int, max_tokens: int = 4) -> list[int]:
    todo = iter(prompts)
    statuses = []
    async with aiohttp.ClientSession() as session:
        async def worker():
            for prompt in todo:
                async with session.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                        json={"model": "demo", "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0}) as r:
                    await r.read()
                    statuses.append(r.status)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def _shared_prefix_workload(seed: int, num_prefixes: int = 24, per_prefix: int = 2) -> list[str]:
    """Prompts sharing long per-group prefixes (a system prompt or document), interleaved.
    Two per prefix: the second hits the first's cache only if it lands on the same replica
    (least-requests: about 1 time in 3; prefix-aware: whenever the bound allows)."""
    rng = random.Random(seed)
    words = "the king said unto his lords that the night was long and full of dread".split()
    prefixes = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(num_prefixes)]
    prompts = [p + f" question {i}: what then?" for p in prefixes for i in range(per_prefix)]
    rng.shuffle(prompts)
    return prompts


def _hit_rate(backends, gw_url: str, key: str, prompts: list[str]) -> float:
    h0, q0 = _prefix_counters(backends)
    statuses = asyncio.run(_send_all(gw_url, key, prompts, concurrency=3))
    assert statuses == [200] * len(prompts)
    h1, q1 = _prefix_counters(backends)
    return (h1 - h0) / (q1 - q0)


def test_prefix_routing_multiplies_the_prefix_cache_hit_rate_within_bounded_loads(backends, tmp_path):
    urls = [b.url for b in backends]
    with gateway(urls, tmp_path / "a.db", "--routing", "least_requests", "--access-log", "off") as least:
        baseline = _hit_rate(backends, least.url, create_key(least.url), _shared_prefix_workload(seed=1))
    with gateway(urls, tmp_path / "b.db", "--routing", "prefix", "--access-log", "off") as prefix:
        key = create_key(prefix.url)
        aware = _hit_rate(backends, prefix.url, key, _shared_prefix_workload(seed=2))
        assert aware >= 1.5 * baseline, (aware, baseline)
        print(f"prefix-cache hit rate: least_requests {baseline:.3f}, prefix {aware:.3f}")

        # A hot prefix at concurrency 6: the bound (c = 1.25) allows ceil(1.25 * 6 / 3) = 3 in
        # flight on one backend, so it spills over the others instead of piling onto one.
        peaks = dict.fromkeys(urls, 0.0)
        done = threading.Event()

        def watch():
            while not done.is_set():
                text = httpx.get(prefix.url + "/metrics").text
                for u in urls:
                    peaks[u] = max(peaks[u], metric(text, "tokenmill:gateway_backend_outstanding_requests", backend=u))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        hot = _shared_prefix_workload(seed=3, num_prefixes=1, per_prefix=36)
        try:
            assert asyncio.run(_send_all(prefix.url, key, hot, concurrency=6, max_tokens=16)) == [200] * 36
        finally:
            done.set()
            watcher.join()
        assert max(peaks.values()) <= 3, peaks
        counts = {u: metric(httpx.get(prefix.url + "/metrics").text, "tokenmill:gateway_requests_total",
                            backend=u, status="200") for u in urls}
        assert sum(1 for c in counts.values() if c > 0) >= 2, counts
        print(f"hot prefix: peak in flight per backend {peaks}, requests {counts}")


def test_a_full_backend_answers_503_and_the_gateway_retries_elsewhere(backends, tmp_path):
    """A backend with room for one request refuses the rest with 503 (tokenmill's admission
    control); the gateway sends those to another backend before any byte reaches the client."""
    with tokenmill_backend(DEMO_MODEL_DIR, *BACKEND_ARGS, "--max-num-seqs", "1",
                           "--max-waiting-requests", "0") as tiny, \
            gateway([tiny.url, backends[1].url], tmp_path / "r.db", "--routing", "least_requests") as gw:
        key = create_key(gw.url)
        prompts = [f"request {i}: once more unto the breach" for i in range(40)]
        assert asyncio.run(_send_all(gw.url, key, prompts, concurrency=8, max_tokens=16)) == [200] * 40
        text = httpx.get(gw.url + "/metrics").text
        assert metric(text, "tokenmill:gateway_retries_total", backend=tiny.url, reason="503") >= 1
        assert metric(text, "tokenmill:gateway_requests_total", backend=tiny.url, status="200") >= 1


async def _one(session: aiohttp.ClientSession, url: str, key: str, i: int) -> dict:
    """One request; for streams, whether any chunk arrived before a failure."""
    stream = i % 2 == 0
    body = {"model": "demo", "prompt": f"request {i}: to be or not to be", "max_tokens": 48,
            "temperature": 0, "stream": stream}
    async with session.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if not stream or r.status != 200:
            return {"stream": stream, "status": r.status, "ok": r.status == 200, "body": await r.text()}
        chunks, error = 0, None
        async for line in r.content:
            line = line.strip()
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                else:
                    chunks += 1
        return {"stream": True, "status": 200, "ok": error is None and chunks > 0, "chunks": chunks,
                "error": error}


def test_killing_a_backend_under_load_fails_no_request_that_had_not_started_streaming(backends, tmp_path):
    urls = [b.url for b in backends]
    victim = backends[0]
    # Passive detection only, so the retries this test counts cannot race an active check that
    # ejects the victim first: no health check during the run, and a circuit that needs more
    # consecutive failures (7) than the 6 requests that can be in flight when the victim dies,
    # so at least one request sent after its death meets the dead port and is retried.
    config = tmp_path / "gateway.toml"
    config.write_text("[health]\nmax_fails = 7\n")
    with gateway(urls, tmp_path / "f.db", "--routing", "least_requests", "--config", str(config),
                 "--health-interval", "600") as gw:
        key = create_key(gw.url)

        async def load():
            async with aiohttp.ClientSession() as session:
                results, todo = [], iter(range(90))

                async def worker():
                    for i in todo:
                        results.append(await _one(session, gw.url, key, i))
                        if len(results) == 20:
                            victim.kill()  # SIGKILL mid-load: in-flight requests on it die with it
                await asyncio.gather(*(worker() for _ in range(6)))
                return results

        results = asyncio.run(load())
        assert len(results) == 90
        failed = [r for r in results if not r["ok"]]
        # The only failures allowed: streams that were already streaming from the victim, each
        # ended with a clean error event.
        for r in failed:
            assert r["stream"] and r["status"] == 200 and r["chunks"] > 0, r
            assert r["error"]["code"] == "upstream_stream_error"
        assert all(r["ok"] for r in results if not r["stream"])
        text = httpx.get(gw.url + "/metrics").text
        assert metric(text, "tokenmill:gateway_backend_circuit_state", backend=victim.url) == 2  # open
        retried = metric_total(text, "tokenmill:gateway_retries_total")
        log = gw.log()
    # Requests sent to the victim after it died (it looked least loaded) went elsewhere.
    assert retried >= 1
    assert "circuit open" in log
    print(f"killed 1 of 3 backends: {len(failed)} stream(s) cut mid-stream, {retried:g} retried, "
          f"{len(results) - len(failed)} of {len(results)} complete")


def test_the_active_health_check_ejects_a_dead_backend(tmp_path):
    """Between requests, only the active check can notice a replica died: within a few
    intervals it is marked unhealthy, gets no traffic, and with no replica left the gateway
    answers 503 no_healthy_backend (and its /health turns 503) instead of hanging."""
    with tokenmill_backend(DEMO_MODEL_DIR, *BACKEND_ARGS) as lone, \
            gateway([lone.url], tmp_path / "h.db") as gw:
        key = create_key(gw.url)
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "demo", "prompt": "hello", "max_tokens": 2}
        assert httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=30).status_code == 200
        lone.kill()
        deadline = time.monotonic() + 10
        while metric(httpx.get(gw.url + "/metrics").text, "tokenmill:gateway_backend_healthy", backend=lone.url):
            assert time.monotonic() < deadline, "the dead backend still looks healthy after 10 s"
            time.sleep(0.1)
        r = httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend", r.text
        assert httpx.get(gw.url + "/health").status_code == 503
        assert "health check failed" in gw.log()
