"""Key records cached for `ttl_s`, so a request reads the database only on a miss.

A revocation or rotation made through this gateway takes effect at once (the admin API
invalidates the entry); through another gateway, within `ttl_s`. Unknown key ids are cached
too (so a flood of made-up keys cannot hammer the database), in a bounded map.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from tokenmill.gateway.keys import KeyRecord
from tokenmill.gateway.store import KeyStore

MAX_ENTRIES = 100_000


class KeyCache:
    def __init__(self, store: KeyStore, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()

    async def get(self, key_id: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._entries.get(key_id)
        if hit is not None and now - hit[1] < self._ttl_s:
            return hit[0]
        record = await asyncio.to_thread(self._store.get, key_id)
        self._entries[key_id] = (record, now)
        self._entries.move_to_end(key_id)
        if len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        return record

    def invalidate(self, key_id: str) -> None:
        self._entries.pop(key_id, None)
