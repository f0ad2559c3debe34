"""Where keys and settled spend live: SQLite (one gateway) or PostgreSQL (several).

The same SQL runs on both; only the driver and its placeholder differ. Calls are
synchronous and short; the gateway makes them off the event loop (`asyncio.to_thread`)
and caches key records (keycache.py), so no request waits on the database in the common
case.

Spend is written here by every gateway as increments (upserts that add), so the table
holds the total of all replicas; the live limiter state (limits.py) is seeded from it when
a budget is first used after a start.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from tokenmill.gateway.keys import KeyLimits, KeyRecord

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS gateway_keys (
        key_id TEXT PRIMARY KEY, salt TEXT NOT NULL, secret_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, key_alias TEXT NOT NULL,
        expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
        models TEXT NOT NULL, metadata TEXT NOT NULL, limits TEXT NOT NULL,
        previous_salt TEXT, previous_hash TEXT, previous_expires_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS gateway_spend (
        key_id TEXT NOT NULL, period TEXT NOT NULL,
        tokens BIGINT NOT NULL, usd DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key_id, period))""",
]
_COLUMNS = ("key_id", "salt", "secret_hash", "created_at", "key_alias", "expires_at", "revoked_at",
            "models", "metadata", "limits", "previous_salt", "previous_hash", "previous_expires_at")


class StoreError(RuntimeError):
    pass


def redact(url: str) -> str:
    """A database or Redis URL fit for logs: the password replaced."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _row(record: KeyRecord) -> tuple:
    d = asdict(record)
    d["models"] = json.dumps(list(record.models))
    d["metadata"] = json.dumps(record.metadata)
    d["limits"] = json.dumps(asdict(record.limits))
    return tuple(d[c] for c in _COLUMNS)


def _record(row: tuple) -> KeyRecord:
    d = dict(zip(_COLUMNS, row))
    d["models"] = tuple(json.loads(d["models"]))
    d["metadata"] = json.loads(d["metadata"])
    d["limits"] = KeyLimits(**json.loads(d["limits"]))
    return KeyRecord(**d)


class KeyStore:
    """Keys and spend in one SQL database.

    Args:
        url: a file path or `sqlite:///path` for SQLite; `postgresql://...` for PostgreSQL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        self._postgres = url.startswith(("postgresql://", "postgres://"))
        self._ph = "%s" if self._postgres else "?"
        self._connect()
        for stmt in _SCHEMA:
            self._execute(stmt)

    def _connect(self) -> None:
        if self._postgres:
            import psycopg

            try:
                self._conn = psycopg.connect(self.url, autocommit=True)
            except psycopg.Error as e:
                raise StoreError(f"cannot connect to the key database {redact(self.url)}: {e}") from e
            return
        path = self.url.removeprefix("sqlite:///")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # WAL: readers never wait for the spend writer; NORMAL sync is durable at checkpoints.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the key database {path!r}: {e}") from e

    def _execute(self, sql: str, params: Iterable = (), fetch: bool = False, many: list | None = None) -> list[tuple]:
        """One statement, or one statement per row of `many` in a single transaction."""
        sql = sql.replace("?", self._ph)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if many is None:
                        cur = self._conn.execute(sql, tuple(params))
                        return list(cur.fetchall()) if fetch else []
                    self._executemany(sql, many)
                    return []
                except Exception as e:
                    # A PostgreSQL restart breaks the connection: reconnect once and repeat.
                    if attempt == 2 or not self._postgres or not self._conn.closed:
                        raise StoreError(f"key database {redact(self.url)}: {e}") from e
                    self._connect()
        return []

    def _executemany(self, sql: str, rows: list) -> None:
        if self._postgres:
            with self._conn.transaction():
                self._conn.cursor().executemany(sql, rows)
            return
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany(sql, rows)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # keys
    def insert(self, record: KeyRecord) -> None:
        marks = ", ".join("?" * len(_COLUMNS))
        self._execute(f"INSERT INTO gateway_keys ({', '.join(_COLUMNS)}) VALUES ({marks})", _row(record))

    def replace(self, record: KeyRecord) -> None:
        sets = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
        self._execute(f"UPDATE gateway_keys SET {sets} WHERE key_id = ?", (*_row(record)[1:], record.key_id))

    def get(self, key_id: str) -> KeyRecord | None:
        rows = self._execute(f"SELECT {', '.join(_COLUMNS)} FROM gateway_keys WHERE key_id = ?",
                             (key_id,), fetch=True)
        return _record(rows[0]) if rows else None

    def list(self) -> list[KeyRecord]:
        rows = self._execute(f"SELECT {', '.join(_COLUMNS)} FROM gateway_keys ORDER BY created_at", fetch=True)
        return [_record(r) for r in rows]

    # spend
    def add_spend(self, rows: list[tuple[str, str, int, float]]) -> None:
        """Add (key_id, period, tokens, usd) increments, all in one transaction."""
        self._execute(
            "INSERT INTO gateway_spend (key_id, period, tokens, usd) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key_id, period) DO UPDATE SET tokens = gateway_spend.tokens + excluded.tokens, "
            "usd = gateway_spend.usd + excluded.usd", many=rows)

    def spend(self, key_id: str, period: str) -> tuple[int, float]:
        rows = self._execute("SELECT tokens, usd FROM gateway_spend WHERE key_id = ? AND period = ?",
                             (key_id, period), fetch=True)
        return (int(rows[0][0]), float(rows[0][1])) if rows else (0, 0.0)
