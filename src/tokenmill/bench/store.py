"""The results history: one SQLite file owns every run and every per-request sample.

Schema (version 1): `runs` holds one row per run with its context as JSON columns and a few
plain columns to filter on; `samples` holds one row per measured request. Chunk timings are
JSON arrays, so ITL can be recomputed exactly later.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokenmill.bench.schema import RequestSample, RunRecord

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,          -- ISO 8601, UTC
    kind TEXT NOT NULL,                -- serve | throughput | capacity
    label TEXT NOT NULL DEFAULT '',
    series TEXT NOT NULL DEFAULT '',   -- the sweep / capacity search a run belongs to
    hardware_sku TEXT NOT NULL,
    instance_type TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    config_hash TEXT NOT NULL DEFAULT '',  -- short hash of the server config, '' if unknown
    interrupted INTEGER NOT NULL DEFAULT 0,
    hardware_json TEXT NOT NULL,
    software_json TEXT NOT NULL,
    server_json TEXT,
    workload_json TEXT NOT NULL,
    summary_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    start_s REAL NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    token_count_source TEXT NOT NULL,
    chunk_times_json TEXT NOT NULL,
    chunk_tokens_json TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE INDEX IF NOT EXISTS runs_by_sku ON runs (hardware_sku, model, created_at);
"""


def default_db_path() -> Path:
    """$TOKENMILL_BENCH_DB, else $XDG_DATA_HOME/tokenmill/bench.db (~/.local/share/...)."""
    if os.environ.get("TOKENMILL_BENCH_DB"):
        return Path(os.environ["TOKENMILL_BENCH_DB"])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "tokenmill" / "bench.db"


def config_hash(server: dict[str, Any] | None) -> str:
    """A short, order-independent hash of the server's engine config ('' when unknown)."""
    config = (server or {}).get("config")
    if not config:
        return ""
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunFilter:
    """History filters; substring matches are case-insensitive, dates are ISO prefixes."""

    sku: str | None = None
    model: str | None = None
    config: str | None = None  # config hash prefix, or a substring of the server config/label
    kind: str | None = None
    series: str | None = None
    since: str | None = None  # inclusive, e.g. "2025-06-01"
    until: str | None = None  # exclusive upper bound on the ISO timestamp
    limit: int | None = None


class Store:
    """Open (and create) the history database; every read and write of runs goes through here."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, run: RunRecord) -> int:
        """Insert a run with its samples; sets run.id and run.created_at.

        Returns:
            The new run id.
        """
        run.created_at = run.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._db:
            cur = self._db.execute(
                "INSERT INTO runs (created_at, kind, label, series, hardware_sku, instance_type, model,"
                " config_hash, interrupted, hardware_json, software_json, server_json, workload_json,"
                " summary_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run.created_at, run.kind, run.label, run.series, run.hardware_sku, run.instance_type,
                 run.model, config_hash(run.server), int(run.interrupted), json.dumps(run.hardware),
                 json.dumps(run.software), json.dumps(run.server) if run.server is not None else None,
                 json.dumps(run.workload), json.dumps(run.summary)),
            )
            run.id = int(cur.lastrowid)
            self._db.executemany(
                "INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(run.id, s.index, s.start_s, s.status, s.error, s.prompt_tokens, s.output_tokens,
                  s.token_count_source, json.dumps(s.chunk_times_s), json.dumps(s.chunk_tokens))
                 for s in run.samples],
            )
        return run.id

    def list_runs(self, flt: RunFilter | None = None) -> list[RunRecord]:
        """Runs matching a filter, newest first, without their samples."""
        flt = flt or RunFilter()
        where, args = [], []
        for column, value in (("hardware_sku", flt.sku), ("model", flt.model), ("series", flt.series)):
            if value:
                where.append(f"{column} LIKE ?")
                args.append(f"%{value}%")
        if flt.config:
            where.append("(config_hash LIKE ? OR server_json LIKE ? OR label LIKE ?)")
            args += [f"{flt.config}%", f"%{flt.config}%", f"%{flt.config}%"]
        if flt.kind:
            where.append("kind = ?")
            args.append(flt.kind)
        if flt.since:
            where.append("created_at >= ?")
            args.append(flt.since)
        if flt.until:
            where.append("created_at < ?")
            args.append(flt.until)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC" + (f" LIMIT {int(flt.limit)}" if flt.limit else "")
        return [self._row_to_run(row) for row in self._query(sql, args)]

    def get_run(self, run_id: int, with_samples: bool = True) -> RunRecord:
        """One run by id (with its samples by default). Raises KeyError if absent."""
        rows = self._query("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise KeyError(f"no run {run_id} in {self.path}")
        run = self._row_to_run(rows[0])
        if with_samples:
            run.samples = self.get_samples(run_id)
        return run

    def get_samples(self, run_id: int) -> list[RequestSample]:
        rows = self._query("SELECT * FROM samples WHERE run_id = ? ORDER BY idx", [run_id])
        return [
            RequestSample(index=r["idx"], start_s=r["start_s"], status=r["status"], error=r["error"],
                          prompt_tokens=r["prompt_tokens"], output_tokens=r["output_tokens"],
                          token_count_source=r["token_count_source"],
                          chunk_times_s=json.loads(r["chunk_times_json"]),
                          chunk_tokens=json.loads(r["chunk_tokens_json"]))
            for r in rows
        ]

    def _query(self, sql: str, args: list[Any]) -> list[sqlite3.Row]:
        self._db.row_factory = sqlite3.Row
        try:
            return list(self._db.execute(sql, args))
        finally:
            self._db.row_factory = None

    @staticmethod
    def _row_to_run(r: sqlite3.Row) -> RunRecord:
        return RunRecord(
            id=r["id"], created_at=r["created_at"], kind=r["kind"], label=r["label"], series=r["series"],
            instance_type=r["instance_type"], model=r["model"], interrupted=bool(r["interrupted"]),
            hardware=json.loads(r["hardware_json"]), software=json.loads(r["software_json"]),
            server=json.loads(r["server_json"]) if r["server_json"] else None,
            workload=json.loads(r["workload_json"]), summary=json.loads(r["summary_json"]),
        )
