"""Settled spend, written to the key database in batches (once a second, off the request
path), and budgets seeded from it when a gateway first meets a key's budget after a start.

The live budget state belongs to the limiter; the database keeps the durable record of
what each key spent (all gateways add their own increments), which /key/info reports and
which survives restarts of the gateway (and of Redis).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from tokenmill.gateway.keys import KeyRecord
from tokenmill.gateway.limits import budget_period
from tokenmill.gateway.store import KeyStore

logger = logging.getLogger("tokenmill.gateway")
FLUSH_INTERVAL_S = 1.0


class SpendLedger:
    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._pending: defaultdict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
        self._seeded: set[str] = set()  # budget ids live in the limiter
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.flush()

    def add(self, key_id: str, budget_id: str | None, tokens: int, usd: float) -> None:
        """Record a settlement: always under 'total', and under the budget's period if it has one."""
        periods = {"total"}
        if budget_id:
            periods.add(budget_id.split(":", 1)[1])
        for period in periods:
            entry = self._pending[(key_id, period)]
            entry[0] += tokens
            entry[1] += usd

    async def ensure_seeded(self, limiter, key: KeyRecord) -> None:
        """Before a key's budget is first checked in this process, load its stored spend."""
        lim = key.limits
        if lim.max_budget is None and lim.max_budget_tokens is None:
            return
        period, _ = budget_period(lim.budget_duration, time.time())
        budget_id = f"{key.key_id}:{period}"
        if budget_id in self._seeded:
            return
        tokens, usd = await asyncio.to_thread(self._store.spend, key.key_id, period)
        await limiter.seed_budget(budget_id, tokens, usd)
        self._seeded.add(budget_id)

    async def flush(self) -> None:
        if not self._pending:
            return
        rows = [(k, p, t, u) for (k, p), (t, u) in self._pending.items()]
        self._pending.clear()
        try:
            await asyncio.to_thread(self._store.add_spend, rows)
        except Exception as e:  # noqa: BLE001 - keep serving; the limiter still holds the truth
            logger.error("could not write spend to the key database (kept for the next try): %s", e)
            for k, p, t, u in rows:
                entry = self._pending[(k, p)]
                entry[0] += t
                entry[1] += u

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()
