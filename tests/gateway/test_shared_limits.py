"""Two gateway processes sharing one Redis (limits, budgets) and one PostgreSQL (keys, spend)
admit exactly the configured limits over 10,000 requests, and a budget is never exceeded.
A control run without Redis shows what the test catches: each gateway admits the limit."""

from __future__ import annotations

import asyncio
import itertools
import random

import aiohttp
import pytest

from tests.gateway.harness import admin, create_key, fake_backend, gateway

CONCURRENCY = 48


async def _fire(urls: list[str], key: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    """Send the bodies round-robin over the gateways, CONCURRENCY at a time."""
    results: list[tuple[int, dict]] = [None] * len(bodies)
    todo = iter(enumerate(bodies))
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker(gw_url: str) -> None:
            for i, body in todo:
                async with session.post(gw_url + "/v1/completions", json=body, headers=headers) as r:
                    results[i] = (r.status, await r.json(content_type=None))
        await asyncio.gather(*(worker(u) for u, _ in zip(itertools.cycle(urls), range(CONCURRENCY))))
    return results


@pytest.fixture(scope="module")
def backend():
    with fake_backend() as b:
        yield b


@pytest.fixture(scope="module")
def pair(backend, redis_url, postgres_url, tmp_path_factory):
    """Two gateways: keys in PostgreSQL, limits in Redis."""
    with gateway([backend.url], postgres_url, "--redis-url", redis_url, "--access-log", "off") as a, \
            gateway([backend.url], postgres_url, "--redis-url", redis_url, "--access-log", "off") as b:
        yield a, b


def test_rpm_and_tpm_are_exact_across_two_gateways_over_10000_requests(pair):
    urls = [g.url for g in pair]
    rpm_key = create_key(urls[0], key_alias="rpm", rpm_limit=1000)
    tpm_key = create_key(urls[1], key_alias="tpm", tpm_limit=30_000)  # made on the other gateway

    async def both():
        # 10 prompt token ids + 20 completion tokens: reservation == usage == 30 tokens.
        body = {"model": "fake", "prompt": list(range(10)), "max_tokens": 20}
        return await asyncio.gather(_fire(urls, rpm_key, [body] * 5000), _fire(urls, tpm_key, [body] * 5000))

    by_rpm, by_tpm = asyncio.run(both())
    for results, name in ((by_rpm, "rpm"), (by_tpm, "tpm")):
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 429}, name
        assert statuses.count(200) == 1000, (name, statuses.count(200))
        limited = [b for s, b in results if s == 429]
        assert all(b["error"]["code"] == "rate_limit_exceeded" for b in limited)
    assert sum(b["usage"]["total_tokens"] for s, b in by_tpm if s == 200) == 30_000


def test_a_budget_is_never_exceeded_across_two_gateways(pair):
    urls = [g.url for g in pair]
    key = create_key(urls[0], key_alias="budget", max_budget_tokens=20_000)
    rng = random.Random(0)
    # Text prompts: the reservation (UTF-8 bytes) is above the usage (words), so settlements
    # give tokens back while other requests are in flight.
    bodies = [{"model": "fake", "prompt": " ".join(["word"] * rng.randint(1, 40)),
               "max_tokens": rng.randint(1, 60)} for _ in range(2000)]
    results = asyncio.run(_fire(urls, key, bodies))
    used = sum(b["usage"]["total_tokens"] for s, b in results if s == 200)
    assert used <= 20_000
    assert used > 20_000 - 300, used  # not trivially: the budget was used up to the last requests
    refused = [b for s, b in results if s == 429]
    assert refused and all(b["error"]["code"] == "insufficient_quota" for b in refused)

    key_id = key.split("-")[2]

    def stored():  # every gateway's spend reaches PostgreSQL within its flush interval
        info = admin(urls[1], "GET", "/key/info", params={"key_id": key_id}).json()
        return info["spend"]["total"]["tokens"] == used

    from tests.server.server_harness import wait_until

    wait_until(stored, timeout=30)


def test_control_without_redis_each_gateway_admits_the_limit(backend, postgres_url):
    """What the shared limiter prevents: in-process limits on two gateways admit 2x."""
    with gateway([backend.url], postgres_url, "--access-log", "off") as a, \
            gateway([backend.url], postgres_url, "--access-log", "off") as b:
        key = create_key(a.url, rpm_limit=100)
        results = asyncio.run(_fire([a.url, b.url], key, [{"model": "fake", "prompt": [1], "max_tokens": 1}] * 400))
        assert [s for s, _ in results].count(200) == 200
