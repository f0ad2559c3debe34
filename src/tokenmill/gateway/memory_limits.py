"""The limits of limits.py for one gateway, in its memory.

Each check-and-record runs without an await between the check and the record, so the event
loop makes it atomic. Idle scopes and ended budget periods are dropped as it goes (bounded
memory: a scope holds at most its window's admissions).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tokenmill.gateway.limits import (
    USD_TOLERANCE,
    WINDOW_S,
    BudgetState,
    Decision,
    LoadSpend,
    Reservation,
    Scope,
    budget_decision,
    budget_state,
    headers_view,
    no_stored_spend,
)

SWEEP_INTERVAL_S = 60.0


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

    @property
    def idle(self) -> bool:
        return not (self.requests or self.tokens or self.in_flight)

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
    spent_tokens: int
    spent_usd: float
    reset_at: float | None
    reserved: dict = field(default_factory=dict)  # request_id -> (tokens, usd)
    reserved_tokens: int = 0
    reserved_usd: float = 0.0


class MemoryLimiter:
    """Args:
        load_spend: a budget's stored spend, read when the budget is first met.
        window_s: the rate window (60 s; shorter only in tests).
    """

    def __init__(self, load_spend: LoadSpend = no_stored_spend, window_s: float = WINDOW_S,
                 clock=time.time) -> None:
        self._load_spend = load_spend
        self._window_s = window_s
        self._clock = clock
        self._scopes: dict[str, _ScopeState] = {}
        self._budgets: dict[str, _BudgetState] = {}
        self._swept_at = clock()

    async def admit(self, res: Reservation) -> Decision:
        budget = res.budget
        if budget is not None and budget.id not in self._budgets:
            tokens, usd = await self._load_spend(budget.id)  # the only await: before any check
            self._budgets.setdefault(budget.id, _BudgetState(tokens, usd, budget.reset_at))
        now = self._clock()
        if now - self._swept_at > SWEEP_INTERVAL_S:
            self._sweep(now)
        states = []
        for scope in res.scopes:
            st = self._scopes.setdefault(scope.id, _ScopeState())
            st.expire(now, self._window_s)
            states.append(st)
            rejection = self._check(scope, st, res.tokens, now)
            if rejection:
                return rejection
        if budget is not None:
            b = self._budgets[budget.id]
            if budget.max_tokens is not None and b.spent_tokens + b.reserved_tokens + res.tokens > budget.max_tokens:
                return budget_decision(budget, "budget_tokens", b.spent_tokens + b.reserved_tokens, bool(b.reserved),
                                       now)
            if budget.max_usd is not None and b.spent_usd + b.reserved_usd + res.usd > budget.max_usd + USD_TOLERANCE:
                return budget_decision(budget, "budget_usd", b.spent_usd + b.reserved_usd, bool(b.reserved), now)
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
        b = self._budgets.get(res.budget.id) if res.budget else None
        if b is None or res.request_id not in b.reserved:  # never admitted
            return None
        r_tokens, r_usd = b.reserved.pop(res.request_id)
        b.reserved_tokens -= r_tokens
        b.reserved_usd -= r_usd
        b.spent_tokens += tokens
        b.spent_usd += usd
        return budget_state(res.budget, b.spent_tokens, b.spent_usd)

    def _sweep(self, now: float) -> None:
        """Forget idle scopes and budgets whose period is over (bounded memory)."""
        self._swept_at = now
        for scope_id, st in list(self._scopes.items()):
            st.expire(now, self._window_s)
            if st.idle:
                del self._scopes[scope_id]
        for budget_id, b in list(self._budgets.items()):
            if b.reset_at is not None and b.reset_at <= now and not b.reserved:
                del self._budgets[budget_id]

    async def close(self) -> None:
        pass
