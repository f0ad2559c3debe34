"""Rate limits and budgets: what is checked, and the in-process limiter.

Every request is checked against a list of scopes (the key, the key on this model, the
model across all keys), each with requests per minute, tokens per minute and concurrent
requests, and against the key's budget for the current period. All checks and all
records happen in one atomic step: either the request is admitted everywhere or nowhere,
so N gateways sharing the state (redis_limits.py) admit exactly what one would.

- Per-minute limits are sliding 60 s windows (a log of admissions), not fixed windows that
  let 2x the limit through around a boundary.
- Tokens are the worst case (prompt + max_tokens), recorded at admission and corrected to
  the real `usage` when the response ends: the window and the budget never hold less than
  what the admitted requests can use, so neither is exceeded by in-flight requests.
- Budgets: spent + reserved + this request's worst case must fit.

MemoryLimiter (memory_limits.py) is the one-gateway implementation; RedisLimiter
(redis_limits.py) implements the same rules as Lua scripts. Both start a budget they do not
hold yet from the spend stored in the database (`LoadSpend`), so budgets survive restarts
of the gateway and of Redis. tests/gateway/test_limiter.py runs one set of cases on both.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

WINDOW_S = 60.0

# budget id -> (tokens, usd) spent in its period as stored in the database.
LoadSpend = Callable[[str], Awaitable[tuple[int, float]]]


async def no_stored_spend(budget_id: str) -> tuple[int, float]:
    return 0, 0.0


@dataclass(frozen=True)
class Scope:
    """One set of limits; None = unlimited."""

    id: str  # "key:<key_id>", "key:<key_id>:model:<model>" or "model:<model>"
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None


@dataclass(frozen=True)
class Budget:
    """A key's budget in the current period."""

    id: str  # "<key_id>:<period>"
    max_tokens: int | None
    max_usd: float | None
    reset_at: float | None  # unix seconds when the period ends; None for a total budget


@dataclass(frozen=True)
class Reservation:
    """What one request asks for: its worst case, recorded in every scope at once."""

    request_id: str
    scopes: tuple[Scope, ...]
    budget: Budget | None
    tokens: int  # prompt (estimated from above) + max_tokens
    usd: float  # the worst case priced


@dataclass(frozen=True)
class Decision:
    admitted: bool
    # Why not: "requests" | "tokens" | "parallel" | "budget_tokens" | "budget_usd"
    limit: str | None = None
    scope_id: str | None = None
    limit_value: float | None = None
    used: float | None = None
    retry_after_s: float | None = None  # None: waiting does not help
    # OpenAI's x-ratelimit-* view of the tightest scope with such a limit (None: no limit).
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True)
class BudgetState:
    """A budget after a settlement (for metrics)."""

    spent_tokens: int
    spent_usd: float
    remaining_tokens: int | None
    remaining_usd: float | None


def budget_period(duration: str, now: float) -> tuple[str, float | None]:
    """(period id, unix seconds when it ends) of a budget duration at `now` (UTC calendar)."""
    t = time.gmtime(now)
    if duration == "daily":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return f"d{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", start + 86400.0
    if duration == "monthly":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return f"m{t.tm_year:04d}-{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))
    return "total", None


def headers_view(scopes: tuple[Scope, ...], counts: list[int], oldest_ages: list[float | None],
                 tokens_used: list[int], window_s: float) -> Decision:
    """An admission with the x-ratelimit-* fields from the scopes' state after it."""
    best_req, best_tok = None, None
    for scope, count, age, used in zip(scopes, counts, oldest_ages, tokens_used):
        reset = window_s - age if age is not None else 0.0
        if scope.rpm is not None:
            rem = max(0, scope.rpm - count)
            if best_req is None or rem < best_req[1]:
                best_req = (scope.rpm, rem, reset)
        if scope.tpm is not None:
            rem = max(0, scope.tpm - used)
            if best_tok is None or rem < best_tok[1]:
                best_tok = (scope.tpm, rem, reset)
    fields = {}
    if best_req:
        fields.update(limit_requests=best_req[0], remaining_requests=best_req[1], reset_requests_s=best_req[2])
    if best_tok:
        fields.update(limit_tokens=best_tok[0], remaining_tokens=best_tok[1], reset_tokens_s=best_tok[2])
    return Decision(True, **fields)


def budget_decision(budget: Budget, which: str, used: float, has_open_reservations: bool,
                    now: float) -> Decision:
    """A budget refusal. Waiting helps while reservations in flight may settle lower, or
    when the period ends; never for a spent total budget."""
    retry = 1.0 if has_open_reservations else (max(1.0, budget.reset_at - now) if budget.reset_at else None)
    limit = budget.max_tokens if which == "budget_tokens" else budget.max_usd
    return Decision(False, which, budget.id, limit, used, retry)


def budget_state(budget: Budget, spent_tokens: int, spent_usd: float) -> BudgetState:
    return BudgetState(
        spent_tokens, spent_usd,
        None if budget.max_tokens is None else max(0, budget.max_tokens - spent_tokens),
        None if budget.max_usd is None else max(0.0, budget.max_usd - spent_usd))


# Float sums of prices must not refuse a request that fits the dollar budget exactly.
USD_TOLERANCE = 1e-9


def ceil_s(seconds: float) -> int:
    """Whole seconds for Retry-After (never 0: 'retry now' would be a lie)."""
    return max(1, math.ceil(seconds))
