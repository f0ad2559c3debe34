"""Settled spend, written to the key database in batches (once a second, off the request
path), and read back when a limiter meets a budget it does not hold (after a start of the
gateway, or of Redis).

The live budget state belongs to the limiter; the database keeps the durable record of
what each key spent (all gateways add their own increments), which /key/info reports and
which survives restarts of the gateway (and of Redis).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from tokenmill.gateway.limits import budget_period
from tokenmill.gateway.store import KeyStore

logger = logging.getLogger("tokenmill.gateway")
FLUSH_INTERVAL_S = 1.0


class SpendLedger:
    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._pending: defaultdict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.flush()

    def add(self, key_id: str, tokens: int, usd: float) -> None:
        """Record a settlement under the key's total and under this day and month, so any
        budget the key gets later (or has now) starts from what it really spent."""
        now = time.time()
        for period in ("total", budget_period("daily", now)[0], budget_period("monthly", now)[0]):
            entry = self._pending[(key_id, period)]
            entry[0] += tokens
            entry[1] += usd

    async def load_spend(self, budget_id: str) -> tuple[int, float]:
        """A budget's spend as stored, plus what this gateway has not written yet (the
        limiters call it when they meet a budget they do not hold)."""
        key_id, period = budget_id.split(":", 1)
        tokens, usd = await asyncio.to_thread(self._store.spend, key_id, period)
        pending = self._pending.get((key_id, period), (0, 0.0))
        return tokens + pending[0], usd + pending[1]

    async def flush(self) -> None:
        if not self._pending:
            return
        rows = [(k, p, t, u) for (k, p), (t, u) in self._pending.items()]
        self._pending.clear()
        try:
            await asyncio.to_thread(self._store.add_spend, rows)  # one transaction: all or none
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
