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

MemoryLimiter here is the one-gateway implementation; RedisLimiter implements the same
rules as Lua scripts. tests/gateway/test_limiter.py runs one set of cases on both.
"""

from __future__ import annotations

import calendar
import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


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


@dataclass
class _ScopeState:
    requests: deque = field(default_factory=deque)  # (admitted_at, request_id), oldest first
    tokens: deque = field(default_factory=deque)  # [admitted_at, request_id, tokens]
    token_entries: dict = field(default_factory=dict)  # request_id -> its entry in `tokens`
    tokens_used: int = 0
    in_flight: set = field(default_factory=set)

    def expire(self, now: float, window_s: float) -> None:
        cutoff = now - window_s
        while self.requests and self.requests[0][0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            _, rid, n = self.tokens.popleft()
            self.tokens_used -= n
            self.token_entries.pop(rid, None)

    def tokens_free_in_s(self, need: int, limit: int, now: float, window_s: float) -> float | None:
        """Seconds until `need` more tokens fit, as the window's entries leave."""
        if need > limit:
            return None
        used = self.tokens_used
        for at, _, n in self.tokens:
            used -= n
            if used + need <= limit:
                return max(0.0, at + window_s - now)
        return 0.0


@dataclass
class _BudgetState:
    spent_tokens: int = 0
    spent_usd: float = 0.0
    reserved: dict = field(default_factory=dict)  # request_id -> (tokens, usd)
    reserved_tokens: int = 0
    reserved_usd: float = 0.0


def budget_rejection(budget: Budget, spent_tokens: int, spent_usd: float, reserved_tokens: int,
                     reserved_usd: float, tokens: int, usd: float, now: float) -> Decision | None:
    """The budget check (shared by both limiters' Python sides)."""
    # Waiting helps if in-flight reservations may settle lower, or when the period ends.
    retry = 1.0 if reserved_tokens or reserved_usd else (
        max(1.0, budget.reset_at - now) if budget.reset_at else None)
    if budget.max_tokens is not None and spent_tokens + reserved_tokens + tokens > budget.max_tokens:
        return Decision(False, "budget_tokens", budget.id, budget.max_tokens, spent_tokens + reserved_tokens, retry)
    # A small tolerance: float sums of prices must not refuse a request that fits exactly.
    if budget.max_usd is not None and spent_usd + reserved_usd + usd > budget.max_usd + 1e-9:
        return Decision(False, "budget_usd", budget.id, budget.max_usd, spent_usd + reserved_usd, retry)
    return None


class MemoryLimiter:
    """The limits of one gateway process, in its memory (the event loop makes each call atomic)."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.time) -> None:
        self._window_s = window_s  # shorter only in tests
        self._clock = clock
        self._scopes: dict[str, _ScopeState] = {}
        self._budgets: dict[str, _BudgetState] = {}

    async def seed_budget(self, budget_id: str, spent_tokens: int, spent_usd: float) -> None:
        """Start a budget from the spend stored in the database (no-op if already live)."""
        self._budgets.setdefault(budget_id, _BudgetState(spent_tokens, spent_usd))

    async def admit(self, res: Reservation) -> Decision:
        now = self._clock()
        states = []
        for scope in res.scopes:
            st = self._scopes.setdefault(scope.id, _ScopeState())
            st.expire(now, self._window_s)
            states.append(st)
            rejection = self._check(scope, st, res.tokens, now)
            if rejection:
                return rejection
        if res.budget is not None:
            b = self._budgets.setdefault(res.budget.id, _BudgetState())
            rejection = budget_rejection(res.budget, b.spent_tokens, b.spent_usd, b.reserved_tokens,
                                         b.reserved_usd, res.tokens, res.usd, now)
            if rejection:
                return rejection
            b.reserved[res.request_id] = (res.tokens, res.usd)
            b.reserved_tokens += res.tokens
            b.reserved_usd += res.usd
        for st in states:
            st.requests.append((now, res.request_id))
            entry = [now, res.request_id, res.tokens]
            st.tokens.append(entry)
            st.token_entries[res.request_id] = entry
            st.tokens_used += res.tokens
            st.in_flight.add(res.request_id)
        return headers_view(res.scopes, [len(s.requests) for s in states],
                            [now - s.requests[0][0] if s.requests else None for s in states],
                            [s.tokens_used for s in states], self._window_s)

    def _check(self, scope: Scope, st: _ScopeState, tokens: int, now: float) -> Decision | None:
        if scope.max_parallel is not None and len(st.in_flight) >= scope.max_parallel:
            return Decision(False, "parallel", scope.id, scope.max_parallel, len(st.in_flight), 1.0)
        if scope.rpm is not None and len(st.requests) >= scope.rpm:
            retry = st.requests[0][0] + self._window_s - now if st.requests else None
            return Decision(False, "requests", scope.id, scope.rpm, len(st.requests), retry)
        if scope.tpm is not None and st.tokens_used + tokens > scope.tpm:
            return Decision(False, "tokens", scope.id, scope.tpm, st.tokens_used,
                            st.tokens_free_in_s(tokens, scope.tpm, now, self._window_s))
        return None

    async def settle(self, res: Reservation, tokens: int, usd: float) -> BudgetState | None:
        """The request ended having used `tokens` (and `usd`): correct its records, free its slot."""
        for scope in res.scopes:
            st = self._scopes.get(scope.id)
            if st is None:
                continue
            st.in_flight.discard(res.request_id)
            entry = st.token_entries.pop(res.request_id, None)
            if entry is not None:  # still in the window: count what it really used
                st.tokens_used += tokens - entry[2]
                entry[2] = tokens
        if res.budget is None:
            return None
        b = self._budgets.get(res.budget.id)
        if b is None:  # never admitted
            return None
        r_tokens, r_usd = b.reserved.pop(res.request_id, (0, 0.0))
        b.reserved_tokens -= r_tokens
        b.reserved_usd -= r_usd
        b.spent_tokens += tokens
        b.spent_usd += usd
        return budget_state(res.budget, b.spent_tokens, b.spent_usd)

    async def close(self) -> None:
        pass


def budget_state(budget: Budget, spent_tokens: int, spent_usd: float) -> BudgetState:
    return BudgetState(
        spent_tokens, spent_usd,
        None if budget.max_tokens is None else max(0, budget.max_tokens - spent_tokens),
        None if budget.max_usd is None else max(0.0, budget.max_usd - spent_usd))


def ceil_s(seconds: float) -> int:
    """Whole seconds for Retry-After (never 0: 'retry now' would be a lie)."""
    return max(1, math.ceil(seconds))
