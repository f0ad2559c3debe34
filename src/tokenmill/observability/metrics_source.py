"""Where `tokenmill watch` reads metrics: `/metrics` endpoints scraped directly, a Prometheus
server's HTTP API, or a recording of either (JSON lines, one snapshot per line).

A snapshot holds raw series values as exposed (counters cumulative, histogram `_bucket`,
`_sum` and `_count` series included), keyed `name{label="value",...}` with labels sorted, so
a recording replays exactly what a live scrape saw.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.observability.slo import SLOS

# What the watcher reads: the server's and the gateway's series, HTTP statuses, CPU time.
KEPT_PREFIXES = ("tokenmill:", "http_requests_total", "process_cpu_seconds_total")  # the gateway's are tokenmill:gateway_*
PROMETHEUS_SELECTOR = '{__name__=~"tokenmill:.+|http_requests_total|process_cpu_seconds_total|up"}'
SLO_BUCKETS = {(slo.histogram, slo.le) for slo in SLOS}
UP = "up"  # per endpoint: 1 if its last scrape answered, as Prometheus's own `up` series


@dataclass(frozen=True)
class Snapshot:
    time_s: float  # unix time of the scrape
    values: dict[str, float]  # series key -> value


def series_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def split_key(key: str) -> tuple[str, dict[str, str]]:
    """The inverse of `series_key` (label values never contain '",' in our series)."""
    if "{" not in key:
        return key, {}
    name, inner = key[:-1].split("{", 1)
    labels = {}
    for part in inner.split('",'):
        k, v = part.split('="', 1)
        labels[k] = v.rstrip('"')
    return name, labels


def _kept(name: str, labels: dict[str, str]) -> bool:
    if not name.startswith(KEPT_PREFIXES):
        return False
    # Histograms are read as sum / count; of their buckets only the SLO bounds (the share of
    # requests within the objective): the rest would be nine tenths of every snapshot.
    return not name.endswith("_bucket") or (name.removesuffix("_bucket"), labels.get("le")) in SLO_BUCKETS


def counter_increase(older: dict[str, float], newer: dict[str, float]) -> float | None:
    """Summed counter increase between two scrapes, series by series as PromQL's sum(rate()):
    a series that went down restarted at 0; one present in only one scrape adds nothing (a
    dead backend's series vanish: summing first would read that as every survivor resetting).
    None when no series is in both."""
    common = older.keys() & newer.keys()
    if not common:
        return None
    return sum(newer[k] - older[k] if newer[k] >= older[k] else newer[k] for k in common)


def parse_exposition(text: str, extra_labels: dict[str, str] | None = None) -> dict[str, float]:
    """The kept series of one Prometheus text exposition."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if _kept(s.name, s.labels):
                values[series_key(s.name, {**s.labels, **(extra_labels or {})})] = float(s.value)
    return values


def instance_of(url: str) -> str:
    return urlsplit(url).netloc


class EndpointSource:
    """Scrapes `/metrics` URLs; each series gets its endpoint's `instance` label, and each
    endpoint an `up` series (0 when it did not answer: a dead backend is itself a signal)."""

    def __init__(self, urls: Iterable[str], timeout_s: float = 5.0) -> None:
        self.urls = list(urls)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def snapshot(self) -> Snapshot:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        now = time.time()
        texts = await asyncio.gather(*(self._fetch(u) for u in self.urls))
        values: dict[str, float] = {}
        for url, text in zip(self.urls, texts):
            labels = {"instance": instance_of(url)}
            values[series_key(UP, labels)] = 0.0 if text is None else 1.0
            if text is not None:
                values.update(parse_exposition(text, labels))
        return Snapshot(now, values)

    async def _fetch(self, url: str) -> str | None:
        try:
            async with self._session.get(url) as r:
                return await r.text() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class PrometheusSource:
    """An instant query of Prometheus's HTTP API for the same series (every target's)."""

    def __init__(self, url: str, selector: str = PROMETHEUS_SELECTOR, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/") + "/api/v1/query"
        self.selector = selector
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def snapshot(self) -> Snapshot:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self.url, params={"query": self.selector}) as r:
            body = await r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus at {self.url} refused the query: {body.get('error', body)}")
        values = {}
        for item in body["data"]["result"]:
            labels = dict(item["metric"])
            name = labels.pop("__name__")
            labels.pop("job", None)
            if name == UP or _kept(name, labels):
                values[series_key(name, labels)] = float(item["value"][1])
        return Snapshot(time.time(), values)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def write_snapshot(fh: IO[str], snapshot: Snapshot) -> None:
    fh.write(json.dumps({"time_s": round(snapshot.time_s, 3), "values": snapshot.values}) + "\n")
    fh.flush()


def open_recording(path: str | Path, mode: str = "r") -> IO[str]:
    """Text handle of a recording; `.gz` paths are gzip-compressed."""
    path = Path(path)
    return gzip.open(path, mode + "t") if path.suffix == ".gz" else open(path, mode)


def iter_recording(path: str | Path) -> Iterator[Snapshot]:
    with open_recording(path) as fh:
        for num, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                yield Snapshot(float(obj["time_s"]), {k: float(v) for k, v in obj["values"].items()})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {num} is not a snapshot ({e!r})") from None


def read_recording(path: str | Path) -> list[Snapshot]:
    return list(iter_recording(path))
