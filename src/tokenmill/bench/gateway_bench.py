"""`tokenmill bench gateway`: the latency and memory the gateway adds, against the fake backend.

Side by side in one run (DESIGN.md, performance method): the same open-loop load generator
sends to the fake backend directly and through `tokenmill gateway serve` in front of it,
alternating target in every pass (ABBA order across passes, so drift cancels), and reports
added p50/p99 = gateway minus direct. The gateway's own histogram
`tokenmill:gateway_added_latency_seconds`, when its /metrics has one, is reported beside it.
Memory mode sends N requests through the gateway, closed loop, and samples its RSS.

The load generator is aiohttp on uvloop (httpx costs about 3x more CPU per request, and on
2 cores the client shares the CPU with both servers). Arrivals are constant-rate and
scheduled against the clock: a late request goes out at once, and its lateness is reported
as send lag. Latency is from the send to the last byte of the response.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from tokenmill.bench import fake_server
from tokenmill.bench.server_process import SERVER_STOP_TIMEOUT_S, free_port, wait_healthy

ADMIN_KEY = "tokenmill-bench-admin"
BODY = b'{"model": "fake", "prompt": "hello world", "max_tokens": 16}'
ADDED_METRIC = "tokenmill:gateway_added_latency_seconds"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """A server to send to: `direct` (the backend) or `gateway` (in front of it)."""

    name: str
    base_url: str
    api_key: str | None = None  # sent as Authorization: Bearer
    pid: int | None = None  # whose RSS memory mode samples


@dataclass(frozen=True)
class GatewayBenchSpec:
    rates: tuple[float, ...] = (100.0, 500.0)  # requests/s, open loop
    duration_s: float = 20.0  # measured seconds per target, rate and pass
    warmup_s: float = 1.0  # unrecorded seconds at the same rate before each measured stretch
    passes: int = 2
    memory_requests: int = 0  # memory mode: requests through the gateway (0: off)
    memory_concurrency: int = 32  # closed loop: the fastest way through N without queueing errors
    memory_sample_every: int = 5000  # requests between RSS samples
    memory_warmup_requests: int = 20000  # RSS slope fitted after this many
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.rates or min(self.rates) <= 0:
            raise ValueError("rates must be positive")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.passes < 1:
            raise ValueError("duration_s must be > 0, warmup_s >= 0, passes >= 1")
        if self.memory_requests < 0 or self.memory_concurrency < 1 or self.memory_sample_every < 1:
            raise ValueError("memory_requests >= 0, memory_concurrency >= 1, memory_sample_every >= 1")


@dataclass
class Cell:
    """What one target measured at one rate, all passes pooled."""

    latencies_s: list[float] = field(default_factory=list)  # successful requests only
    lags_s: list[float] = field(default_factory=list)  # send time - scheduled time
    errors: list[str] = field(default_factory=list)  # non-200 statuses and client errors
    num_responses: int = 0
    elapsed_s: float = 0.0  # first scheduled send to last response, summed over passes

    def pct_ms(self, p: float, values: str = "latencies_s") -> float | None:
        v = getattr(self, values)
        return float(np.percentile(v, p)) * 1000 if v else None

    @property
    def achieved_rate(self) -> float:
        return self.num_responses / self.elapsed_s if self.elapsed_s else 0.0


@dataclass
class Histogram:
    """A Prometheus histogram summed over its label sets: cumulative counts by upper bound."""

    buckets: dict[float, float]
    sum: float
    count: float

    def __add__(self, other: Histogram) -> Histogram:
        return self._combine(other, 1.0)

    def __sub__(self, other: Histogram) -> Histogram:
        return self._combine(other, -1.0)

    def _combine(self, other: Histogram, sign: float) -> Histogram:
        bounds = self.buckets.keys() | other.buckets.keys()
        return Histogram({le: self.buckets.get(le, 0.0) + sign * other.buckets.get(le, 0.0) for le in bounds},
                         self.sum + sign * other.sum, self.count + sign * other.count)

    def quantile(self, q: float) -> float | None:
        """Prometheus histogram_quantile: linear within the bucket holding rank q * count."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for le in sorted(self.buckets):
            if self.buckets[le] >= rank:
                if le == float("inf"):
                    return lower
                width = self.buckets[le] - below
                return lower + (le - lower) * ((rank - below) / width if width else 1.0)
            lower, below = le, self.buckets[le]
        return lower


def parse_histogram(text: str, name: str) -> Histogram | None:
    """The histogram `name` from Prometheus text exposition, or None when absent."""
    buckets: dict[float, float] = {}
    total = {"_sum": 0.0, "_count": 0.0}
    found = False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"{re.escape(name)}(_bucket|_sum|_count)(?:\{{(.*)\}})?\s+(\S+)", line)
        if not m:
            continue
        found = True
        suffix, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if suffix == "_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                bound = float(le.group(1).replace("Inf", "inf"))
                buckets[bound] = buckets.get(bound, 0.0) + value
        else:
            total[suffix] += value
    return Histogram(buckets, total["_sum"], total["_count"]) if found else None


@dataclass
class MemoryResult:
    series: list[tuple[int, float]]  # (requests done, gateway RSS in MiB); the first before any load
    errors: list[str]
    elapsed_s: float
    warmup_requests: int

    @property
    def slope_mib_per_100k(self) -> float | None:
        """Least-squares RSS slope after the warm-up, MiB per 100,000 requests (None: < 2 samples)."""
        pts = [(n, m) for n, m in self.series if n >= self.warmup_requests]
        if len(pts) < 2:
            return None
        return float(np.polyfit([n for n, _ in pts], [m for _, m in pts], 1)[0]) * 100_000


@dataclass
class GatewayBenchResult:
    spec: GatewayBenchSpec
    cells: dict[tuple[str, float], Cell]  # (target name, rate)
    inside: dict[float, Histogram]  # rate -> the gateway's own histogram over the measured stretches
    memory: MemoryResult | None
    notes: list[str]

    @property
    def num_errors(self) -> int:
        return sum(len(c.errors) for c in self.cells.values()) + (len(self.memory.errors) if self.memory else 0)


def rss_mib(pid: int) -> float:
    """Resident set size of a process (VmRSS of /proc/PID/status), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def _process(cmd: list[str], port: int, name: str, start_timeout_s: float) -> Iterator[tuple[str, int]]:
    """server_process.server_command, yielding the pid too (memory mode samples it)."""
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(proc, base, log, name, start_timeout_s)
            yield base, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def fake_server_process(model: str = "fake", ttft_ms: float = 0.0, inter_token_ms: float = 0.0) -> Iterator[Target]:
    """The fake backend as a subprocess on a free loopback port, run as a file in isolated mode
    (-I): it imports nothing from tokenmill, so neither the package nor torch load."""
    port = free_port()
    cmd = [sys.executable, "-I", fake_server.__file__, "--port", str(port), "--model", model,
           "--ttft-ms", str(ttft_ms), "--inter-token-ms", str(inter_token_ms)]
    with _process(cmd, port, "fake server", 30.0) as (url, pid):
        yield Target("direct", url, None, pid)


def create_api_key(gateway_url: str, admin_key: str = ADMIN_KEY) -> str:
    """A key with limits far above the load (POST /key/generate), so limit checks run but never bite."""
    r = httpx.post(f"{gateway_url}/key/generate", headers={"Authorization": f"Bearer {admin_key}"},
                   json={"key_alias": "bench", "rpm_limit": 100_000_000, "tpm_limit": 10_000_000_000}, timeout=30)
    if r.status_code != 200 or "key" not in r.json():
        raise RuntimeError(f"gateway POST /key/generate answered {r.status_code}: {r.text[:300]}")
    return r.json()["key"]


@contextmanager
def gateway_process(backend_url: str, tmp_dir: Path, admin_key: str = ADMIN_KEY,
                    extra_args: Sequence[str] = ()) -> Iterator[Target]:
    """`tokenmill gateway serve` in front of backend_url, on a free port, with one API key made.

    Args:
        backend_url: the fake backend's base URL.
        tmp_dir: where the gateway's SQLite key database goes.
        admin_key: the admin key it is started with (makes the API key).
        extra_args: further `gateway serve` flags, e.g. ["--access-log", "off"].
    """
    port = free_port()
    run = ["-m", "tokenmill"] if importlib.util.find_spec("tokenmill.__main__") else \
        ["-c", "from tokenmill.cli import main; raise SystemExit(main())"]
    cmd = [sys.executable, *run, "gateway", "serve", "--backend", backend_url, "--port", str(port), "--host", "127.0.0.1",
           "--admin-key", admin_key, "--db", str(tmp_dir / "gateway.db"), *extra_args]
    with _process(cmd, port, "tokenmill gateway", 120.0) as (url, pid):
        yield Target("gateway", url, create_api_key(url, admin_key), pid)


def _session(limit: int, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


def _headers(target: Target) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if target.api_key:
        h["Authorization"] = f"Bearer {target.api_key}"
    return h


async def _post(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str | None:
    """One completion request; an error message, or None when it answered 200."""
    try:
        async with session.post(url, data=BODY, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                return f"HTTP {resp.status}: {body[:200].decode(errors='replace')}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def _open_loop(session: aiohttp.ClientSession, target: Target, rate: float, duration_s: float, cell: Cell | None) -> None:
    """Send round(rate * duration_s) requests every 1/rate s on the clock; record into cell."""
    url, headers, tasks = f"{target.base_url}/v1/completions", _headers(target), []
    t0 = time.perf_counter()
    last_done = t0

    async def one(due: float) -> None:
        nonlocal last_done
        start = time.perf_counter()
        error = await _post(session, url, headers)
        last_done = end = time.perf_counter()
        if cell is None:
            return
        cell.num_responses += 1
        if error:
            cell.errors.append(error)
        else:
            cell.latencies_s.append(end - start)
            cell.lags_s.append(start - due)

    for i in range(round(rate * duration_s)):
        due = t0 + i / rate
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    if cell is not None:
        cell.elapsed_s += last_done - t0


async def _scrape(session: aiohttp.ClientSession, target: Target) -> Histogram | None:
    try:
        async with session.get(f"{target.base_url}/metrics") as resp:
            return parse_histogram(await resp.text(), ADDED_METRIC) if resp.status == 200 else None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None


async def _measure_rates(spec: GatewayBenchSpec, targets: tuple[Target, Target], progress: Progress,
                         ) -> tuple[dict[tuple[str, float], Cell], dict[float, Histogram]]:
    cells = {(t.name, r): Cell() for t in targets for r in spec.rates}
    inside: dict[float, Histogram] = {}
    for p in range(spec.passes):
        for rate in spec.rates:
            for target in targets if p % 2 == 0 else targets[::-1]:
                progress(f"pass {p + 1}/{spec.passes}: {target.name} at {rate:g} req/s for {spec.duration_s:g} s")
                async with _session(10_000, spec.request_timeout_s) as session:
                    await _open_loop(session, target, rate, spec.warmup_s, None)
                    before = await _scrape(session, target) if target.name == "gateway" else None
                    cell = cells[(target.name, rate)]
                    num_ok, num_errors = len(cell.latencies_s), len(cell.errors)
                    await _open_loop(session, target, rate, spec.duration_s, cell)
                    after = await _scrape(session, target) if before is not None else None
                if before is not None and after is not None:
                    delta = after - before
                    inside[rate] = inside[rate] + delta if rate in inside else delta
                new = np.asarray(cell.latencies_s[num_ok:]) * 1000
                if new.size:
                    progress(f"  p50 {np.percentile(new, 50):.2f} ms, p99 {np.percentile(new, 99):.2f} ms")
                if len(cell.errors) > num_errors:
                    progress(f"  {len(cell.errors) - num_errors} errors, e.g. {cell.errors[-1]}")
    return cells, inside


async def _measure_memory(spec: GatewayBenchSpec, target: Target, progress: Progress) -> MemoryResult:
    assert target.pid is not None, "memory mode needs the gateway's pid"
    n, every = spec.memory_requests, spec.memory_sample_every
    url, headers = f"{target.base_url}/v1/completions", _headers(target)
    series, errors = [(0, rss_mib(target.pid))], []
    state = {"sent": 0, "done": 0}
    t0 = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        while state["sent"] < n:
            state["sent"] += 1
            error = await _post(session, url, headers)
            if error:
                errors.append(error)
            state["done"] += 1
            if state["done"] % every == 0 or state["done"] == n:
                series.append((state["done"], rss_mib(target.pid)))
                if state["done"] % (every * 4) == 0 or state["done"] == n:
                    rate = state["done"] / (time.perf_counter() - t0)
                    progress(f"memory: {state['done']:,}/{n:,} requests, {rate:,.0f} req/s, "
                             f"RSS {series[-1][1]:.1f} MiB, {len(errors)} errors")

    async with _session(spec.memory_concurrency, spec.request_timeout_s) as session:
        await asyncio.gather(*(worker(session) for _ in range(spec.memory_concurrency)))
    return MemoryResult(series, errors, time.perf_counter() - t0, spec.memory_warmup_requests)


def run_gateway_bench(spec: GatewayBenchSpec, direct: Target, gateway: Target,
                      progress: Progress = lambda _: None) -> GatewayBenchResult:
    """Measure direct vs gateway at every rate, then (memory_requests > 0) the gateway's RSS.

    Args:
        spec: rates, durations, passes, memory mode.
        direct: the backend; gateway: the gateway in front of it (with api_key, and pid for
            memory mode). Any two OpenAI-compatible servers will do (the tests use two fakes).
        progress: called with one line per stretch measured.

    Returns:
        Latency cells per (target name, rate), the gateway's own histogram per rate, memory.
    """
    # Everything imported so far (the CLI pulls in torch) is long-lived: frozen out of the
    # garbage collector, whose full passes over it were 50 ms stalls in the client's p99.
    gc.collect()
    gc.freeze()

    async def main() -> GatewayBenchResult:
        cells, inside = await _measure_rates(spec, (direct, gateway), progress)
        memory = await _measure_memory(spec, gateway, progress) if spec.memory_requests else None
        notes = [] if inside else [f"the gateway's /metrics has no {ADDED_METRIC} histogram"]
        return GatewayBenchResult(spec, cells, inside, memory, notes)

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
