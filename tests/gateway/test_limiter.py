"""The limit rules, one set of cases run on the in-process limiter and on the Redis one (a
real redis-server): both must make the same decisions."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tokenmill.gateway.limits import Budget, Reservation, Scope, budget_period
from tokenmill.gateway.memory_limits import MemoryLimiter

WINDOW_S = 1.0  # a short window so sliding can be tested in real time


STORED = {"k:d2026-12-02": (0, 0.75)}  # spend "in the database" before the limiter started


async def load_spend(budget_id: str) -> tuple[int, float]:
    return STORED.get(budget_id, (0, 0.0))


@pytest.fixture(params=["memory", "redis"])
def limiter(request):
    if request.param == "memory":
        lim = MemoryLimiter(load_spend, window_s=WINDOW_S)
    else:
        from tokenmill.gateway.redis_limits import RedisLimiter

        lim = RedisLimiter(request.getfixturevalue("clean_redis"), load_spend, window_s=WINDOW_S)
    return lim  # (a Redis client is bound to the event loop of the test that uses it)


def run(coro):
    return asyncio.run(coro)


def res(*scopes, tokens=10, usd=0.0, budget=None):
    return Reservation(uuid.uuid4().hex, tuple(scopes), budget, tokens, usd)


def test_rpm_admits_exactly_the_limit_then_slides(limiter):
    async def go():
        scope = Scope("key:a", rpm=5)
        decisions = [await limiter.admit(res(scope)) for _ in range(7)]
        assert [d.admitted for d in decisions] == [True] * 5 + [False] * 2
        assert [d.remaining_requests for d in decisions[:5]] == [4, 3, 2, 1, 0]
        assert decisions[0].limit_requests == 5
        refused = decisions[5]
        assert refused.limit == "requests" and refused.scope_id == "key:a" and refused.used == 5
        assert 0 < refused.retry_after_s <= WINDOW_S
        await asyncio.sleep(WINDOW_S + 0.05)  # the window slid past all five
        assert (await limiter.admit(res(scope))).admitted
    run(go())


def test_tpm_reserves_the_worst_case_and_settles_to_usage(limiter):
    async def go():
        scope = Scope("key:t", tpm=100)
        held = [res(scope, tokens=30) for _ in range(3)]
        assert all([(await limiter.admit(r)).admitted for r in held])
        over = await limiter.admit(res(scope, tokens=30))
        assert not over.admitted and over.limit == "tokens" and over.used == 90
        assert over.retry_after_s is not None and over.retry_after_s <= WINDOW_S
        await limiter.settle(held[0], 10, 0.0)  # used 10 of its 30: 20 free again
        assert (await limiter.admit(res(scope, tokens=30))).admitted  # 10 + 30 + 30 + 30 = 100
        assert not (await limiter.admit(res(scope, tokens=1))).admitted
        too_big = await limiter.admit(res(Scope("key:t2", tpm=100), tokens=101))
        assert not too_big.admitted and too_big.retry_after_s is None  # waiting never helps
    run(go())


def test_parallel_slots_free_on_settle(limiter):
    async def go():
        scope = Scope("key:p", max_parallel=2)
        a, b = res(scope), res(scope)
        assert (await limiter.admit(a)).admitted and (await limiter.admit(b)).admitted
        refused = await limiter.admit(res(scope))
        assert not refused.admitted and refused.limit == "parallel" and refused.retry_after_s == 1.0
        await limiter.settle(a, 5, 0.0)
        assert (await limiter.admit(res(scope))).admitted
    run(go())


def test_a_refusal_in_one_scope_records_nothing_in_the_others(limiter):
    async def go():
        loose, tight = Scope("key:l", rpm=100, tpm=10_000), Scope("model:m", rpm=1)
        assert (await limiter.admit(res(loose, tight))).admitted
        for _ in range(5):
            assert not (await limiter.admit(res(loose, tight))).admitted
        d = await limiter.admit(res(loose))
        assert d.remaining_requests == 98  # 100 - the one admitted - this one: refusals left no trace
        assert d.remaining_tokens == 10_000 - 20
    run(go())


def test_token_budget_counts_reservations_then_spend(limiter):
    async def go():
        budget = Budget("k:total", max_tokens=100, max_usd=None, reset_at=None)
        first = res(tokens=60, budget=budget)
        assert (await limiter.admit(first)).admitted
        refused = await limiter.admit(res(tokens=60, budget=budget))
        assert not refused.admitted and refused.limit == "budget_tokens" and refused.used == 60
        assert refused.retry_after_s == 1.0  # a reservation may settle lower
        state = await limiter.settle(first, 20, 0.0)
        assert state.spent_tokens == 20 and state.remaining_tokens == 80
        second = res(tokens=60, budget=budget)
        assert (await limiter.admit(second)).admitted  # 20 spent + 60 reserved <= 100
        await limiter.settle(second, 80, 0.0)  # at most the reservation in practice; here exactly full
        final = await limiter.admit(res(tokens=1, budget=budget))
        assert not final.admitted and final.retry_after_s is None  # a total budget never resets
    run(go())


def test_dollar_budget_starts_from_stored_spend(limiter):
    async def go():
        budget = Budget("k:d2026-12-02", max_tokens=None, max_usd=1.0, reset_at=time.time() + 3600)
        first = res(usd=0.25, budget=budget)
        assert (await limiter.admit(first)).admitted  # 0.75 stored + 0.25: exactly the budget
        refused = await limiter.admit(res(usd=0.01, budget=budget))
        assert not refused.admitted and refused.limit == "budget_usd" and refused.used == pytest.approx(1.0)
        assert refused.retry_after_s == 1.0  # the reservation in flight may settle lower
        await limiter.settle(first, 10, 0.25)
        spent = await limiter.admit(res(usd=0.01, budget=budget))
        assert 3590 < spent.retry_after_s <= 3600  # nothing in flight: wait for the period's end
    run(go())


def test_redis_reloads_a_budget_it_lost(clean_redis):
    """Budgets survive a Redis restart (here: its data flushed): the next admission starts
    again from the spend stored in the database."""
    import redis

    from tokenmill.gateway.redis_limits import RedisLimiter

    async def go():
        lim = RedisLimiter(clean_redis, load_spend)
        budget = Budget("k:d2026-12-02", max_tokens=None, max_usd=1.0, reset_at=time.time() + 3600)
        assert (await lim.admit(res(usd=0.2, budget=budget))).admitted
        redis.Redis.from_url(clean_redis).flushall()
        assert (await lim.admit(res(usd=0.25, budget=budget))).admitted  # 0.75 stored + 0.25
        assert not (await lim.admit(res(usd=0.01, budget=budget))).admitted
        await lim.close()
    run(go())


def test_concurrent_admissions_never_pass_the_limit(limiter):
    async def go():
        scope = Scope("key:c", rpm=50, tpm=1_000)
        decisions = await asyncio.gather(*(limiter.admit(res(scope, tokens=30)) for _ in range(200)))
        assert sum(d.admitted for d in decisions) == 33  # tpm binds first: 33 x 30 <= 1000
    run(go())


def test_budget_periods_are_utc_calendar_days_and_months():
    t = 1796183303.0  # 2026-12-02 03:48:23 UTC
    assert budget_period("daily", t) == ("d2026-12-02", 1796256000.0)
    assert budget_period("monthly", t) == ("m2026-12", 1798761600.0)  # 2027-01-01
    assert budget_period("total", t) == ("total", None)
