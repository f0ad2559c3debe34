"""The live system a fault is injected into: `tokenmill serve` processes (and a `tokenmill
gateway` in front of two of them), the metrics recorder, and `tokenmill watch` as a
subprocess. Everything runs on loopback ports of this machine; nothing here injects faults.

Processes are kept as handles (not context managers around a URL, as in server_process.py)
because a fault may SIGKILL one and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.bench.server_process import (
    SERVER_START_TIMEOUT_S,
    SERVER_STOP_TIMEOUT_S,
    free_port,
    wait_healthy,
)
from tokenmill.observability.metrics_source import (
    EndpointSource,
    Snapshot,
    open_recording,
    write_snapshot,
)

WATCH_STOP_TIMEOUT_S = 30.0  # the watcher writes its last incidents after SIGINT
_CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@dataclass
class ServerProcess:
    """One child server on a fixed loopback port; its output goes to `log_path`."""

    name: str
    cmd: list[str]  # must make the server listen on 127.0.0.1:port
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def start(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        """Start it and wait until GET /health answers 200 (RuntimeError with its log if not)."""
        log = open(self.log_path, "ab+")  # appended: a restarted server keeps its first log
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env={**_CHILD_ENV, **self.env})
        log.close()  # the child holds its own descriptor
        with open(self.log_path, "rb") as tail:
            try:
                wait_healthy(self.proc, self.url, tail, self.name, timeout_s)
            except RuntimeError:
                self.kill()
                raise

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye (the backend_killed fault)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (the server drains), killed if it has not exited in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()


def tokenmill_server(name: str, model: str, workdir: Path, extra_args: Sequence[str] = (),
                     num_threads: int | None = None) -> ServerProcess:
    """A `tokenmill serve` (not started). Request logs are off: they cost CPU the faults measure.

    num_threads: the engine's compute threads (OMP_NUM_THREADS); None: all cores. Replicas
    sharing a machine get a share each, as pinned replicas would: two replicas spinning two
    threads each on two cores slow each other down many times over.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--disable-log-requests", "--uvicorn-log-level", "warning", *extra_args]
    env = {} if num_threads is None else {"OMP_NUM_THREADS": str(num_threads)}
    return ServerProcess(name, cmd, port, workdir / f"{name}.log", env)


def tokenmill_gateway(backends: Sequence[ServerProcess], workdir: Path, health_interval_s: float) -> ServerProcess:
    """A `tokenmill gateway serve` without keys in front of `backends` (not started)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--no-auth", "--db", str(workdir / "gateway.db"), "--health-interval", f"{health_interval_s:g}",
           "--access-log", "off", "--log-level", "warning"]
    for b in backends:
        cmd += ["--backend", b.url]
    return ServerProcess("gateway", cmd, port, workdir / "gateway.log")


@dataclass
class Deployment:
    """What a fault runs against: the servers, where the load goes, what is scraped."""

    target: ServerProcess  # the load generator's server (the gateway when there is one)
    servers: list[ServerProcess]  # the `tokenmill serve` processes
    gateway: ServerProcess | None = None

    @property
    def processes(self) -> list[ServerProcess]:
        return [*self.servers, *([self.gateway] if self.gateway else [])]

    @property
    def metrics_urls(self) -> list[str]:
        return [p.metrics_url for p in self.processes]


@contextlib.contextmanager
def deployed(deployment: Deployment, say: Callable[[str], None]) -> Iterator[Deployment]:
    """Start the servers, then the gateway; stop all of them when the block ends."""
    try:
        for p in deployment.processes:
            say(f"starting {p.name} on port {p.port}")
            p.start()
        yield deployment
    finally:
        for p in reversed(deployment.processes):
            p.stop()


def host_busy_cpu_s() -> float:
    """CPU seconds every core of this machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_tree_cpu_s() -> float:
    """CPU seconds of this process and all its descendants, living or reaped: the harness,
    its load generator, the servers, the watcher, the CPU hogs."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15).
        parents[int(entry)] = int(rest[1])
        times[int(entry)] = sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in ours:
                ours.add(child)
                frontier.append(child)
    return sum(times.get(pid, 0.0) for pid in ours)


@dataclass
class Recorder:
    """Scrapes the metrics URLs every interval into a recording (gzip when the path ends in
    .gz) and keeps the snapshots for the report. Beside each scrape it notes the machine's
    busy CPU and this process tree's, so a run disturbed by other work on a shared machine
    can be told from the fault."""

    urls: list[str]
    path: Path
    interval_s: float = 1.0
    snapshots: list[Snapshot] = field(default_factory=list)
    host_cpu: list[tuple[float, float, float]] = field(default_factory=list)  # (unix s, host busy s, ours s)

    async def run(self, stop: asyncio.Event) -> None:
        source = EndpointSource(self.urls)
        start = time.monotonic()
        tick = 0
        try:
            with open_recording(self.path, "w") as fh:
                while not stop.is_set():
                    snapshot = await source.snapshot()
                    self.snapshots.append(snapshot)
                    self.host_cpu.append((snapshot.time_s, host_busy_cpu_s(), own_tree_cpu_s()))
                    write_snapshot(fh, snapshot)
                    # On a fixed grid: a slow scrape delays one point, not every later one.
                    tick = max(tick + 1, int((time.monotonic() - start) / self.interval_s) + 1)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), start + tick * self.interval_s - time.monotonic())
        finally:
            await source.close()


class Watcher:
    """`tokenmill watch` against the deployment's /metrics, writing incidents to a JSON-lines log."""

    def __init__(self, metrics_urls: Sequence[str], incident_log: Path, log_path: Path, interval_s: float = 1.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.incident_log = incident_log
        self.log_path = log_path
        cmd = [sys.executable, "-m", "tokenmill", "watch", "--interval-s", f"{interval_s:g}",
               "--incident-log", str(incident_log), *extra_args]
        for url in metrics_urls:
            cmd += ["--metrics-url", url]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=_CHILD_ENV)

    def stop(self) -> int | None:
        """SIGINT, as an operator's Ctrl-C; returns the exit code (None: it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=WATCH_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode
