"""The faults the harness injects, each with `inject()` and `remove()`, and the load they ride
on. All load, steady or extra, is the bench lab's own generator (runner.run_load: open loop,
Poisson arrivals); the slow readers are raw sockets because an HTTP client library reads
eagerly into its own buffer, which is exactly what a slow client does not do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from tokenmill.bench.arrivals import iter_arrival_offsets
from tokenmill.bench.client import EndpointSpec, build_payload
from tokenmill.bench.fault_stack import ServerProcess
from tokenmill.bench.runner import LoadResult, run_load
from tokenmill.bench.schema import LoadSpec, RequestSpec
from tokenmill.bench.tokenizer import TokenizerLike
from tokenmill.bench.workloads import WorkloadSpec, iter_requests

LOAD_REQUEST_TIMEOUT_S = 120.0  # a request stuck longer than this counts as failed


@dataclass(frozen=True)
class LoadShape:
    """An open-loop load: Poisson arrivals of random-token completions."""

    request_rate: float  # requests/s
    input_len: int  # mean prompt tokens
    output_len: int  # mean max_tokens (ignore_eos: exactly that many are generated)
    range_ratio: float = 0.25  # lengths uniform in [len*(1-r), len*(1+r)]
    seed: int = 0

    def workload(self) -> WorkloadSpec:
        return WorkloadSpec(random_input_len=self.input_len, random_output_len=self.output_len,
                            random_range_ratio=self.range_ratio, seed=self.seed)


async def offer_load(endpoint: EndpointSpec, tokenizer: TokenizerLike, shape: LoadShape, duration_s: float,
                     stop: asyncio.Event, num_warmups: int = 0) -> LoadResult:
    """Send `shape` for `duration_s` (in-flight requests then finish) or until `stop` is set."""
    workload = shape.workload()
    load = LoadSpec(request_rate=shape.request_rate, num_prompts=None, duration_s=duration_s,
                    num_warmups=num_warmups, seed=shape.seed)
    return await run_load(endpoint, iter_requests(workload, tokenizer, stream=0),
                          iter_requests(workload, tokenizer, stream=1), load, show_progress=False, stop=stop)


class Fault(Protocol):
    description: str  # one line for the report: what was done

    async def inject(self) -> None: ...

    async def remove(self) -> None: ...

    async def close(self) -> str | None:
        """After the run: wait for what the fault left running; a note if it went wrong."""


class CpuHog:
    """Processes spinning beside the server: on a small machine they take cores the engine
    thread and the event loop need, as a noisy neighbour or a runaway cron job would."""

    def __init__(self, num_processes: int = 2) -> None:
        self.num_processes = num_processes
        self.description = f"{num_processes} busy-loop processes beside the server"
        self._procs: list[subprocess.Popen] = []

    async def inject(self) -> None:
        self._procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
                       for _ in range(self.num_processes)]

    async def remove(self) -> None:
        for p in self._procs:
            p.kill()
            p.wait()
        self._procs = []

    async def close(self) -> str | None:
        await self.remove()  # idempotent: nothing is left spinning whatever happened
        return None


class ExtraLoad:
    """A second open-loop load on top of the steady one for the fault's duration: long prompts
    (a prefill flood), or long outputs (more sequences holding KV blocks at once). Removal stops
    the sending; requests in flight finish, as they would after a real burst."""

    def __init__(self, endpoint: EndpointSpec, tokenizer: TokenizerLike, shape: LoadShape, duration_s: float,
                 stop: asyncio.Event, description: str) -> None:
        self._args = (endpoint, tokenizer, shape, duration_s, stop)
        self.description = description
        self.task: asyncio.Task[LoadResult] | None = None  # awaited by the harness at the end

    async def inject(self) -> None:
        self.task = asyncio.create_task(offer_load(*self._args))

    async def remove(self) -> None:
        pass  # the load stops sending by itself after duration_s

    async def close(self) -> str | None:
        if self.task is None:
            return None
        result = await self.task
        failed = [x for x in result.samples if x.status == "error"]
        return (f"fault load: {len(result.samples)} requests sent, {len(failed)} failed"
                + (f" (first: {failed[0].error[:120]})" if failed else ""))


@dataclass(frozen=True)
class SlowReaderShape:
    """Streaming clients on tiny TCP windows that read a few bytes now and then.

    Such a client alone is invisible to the server: the kernel's send buffer (Linux autotunes
    it up to net.ipv4.tcp_wmem's 4 MiB) takes a whole response of a few thousand tokens
    (about 320 B per SSE event), the handler finishes and counts a 200. What the server does
    see is the reader giving up mid-stream, its request still generating: an abort, a 499.
    `give_up_after_s` None keeps every connection until the fault is removed.
    """

    arrival_rate_per_s: float = 1.5  # new slow clients per second, Poisson
    input_len: int = 32
    max_tokens: int = 900  # long enough to still be generating when the client gives up
    receive_buffer_bytes: int = 4096  # SO_RCVBUF before connect: a tiny TCP window
    read_bytes: int = 64  # read this much...
    read_every_s: float = 0.25  # ...this often
    give_up_after_s: float | None = 0.75  # then close the connection


class SlowReaders:
    """Slow streaming clients arriving during the fault (see SlowReaderShape). Removal stops
    new ones and closes the connections still open."""

    def __init__(self, endpoint: EndpointSpec, tokenizer: TokenizerLike, host: str, port: int,
                 shape: SlowReaderShape = SlowReaderShape()) -> None:
        self.shape = shape
        patience = ("hold the connection" if shape.give_up_after_s is None
                    else f"hang up after {shape.give_up_after_s:g} s")
        self.description = (f"{shape.arrival_rate_per_s:g}/s streaming clients (max_tokens {shape.max_tokens}) "
                            f"on a {shape.receive_buffer_bytes} B receive buffer, reading {shape.read_bytes} B "
                            f"every {shape.read_every_s:g} s; they {patience}")
        self._address = (host, port)
        self._path = urlsplit(endpoint.url).path
        self._endpoint = endpoint
        workload = WorkloadSpec(random_input_len=shape.input_len, random_output_len=shape.max_tokens, seed=3)
        self._requests: Iterator[RequestSpec] = iter_requests(workload, tokenizer, stream=0)
        self._tasks: list[asyncio.Task] = []
        self._opener: asyncio.Task | None = None
        self.num_clients = 0
        self.num_ended_by_server = 0  # responses the server finished before the client left
        self.num_bytes_read = 0

    def _request_bytes(self) -> bytes:
        body = json.dumps(build_payload(self._endpoint, next(self._requests))).encode()
        head = (f"POST {self._path} HTTP/1.1\r\nHost: {self._address[0]}:{self._address[1]}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def _client(self, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect: the window scale is agreed in the handshake.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.shape.receive_buffer_bytes)
        sock.setblocking(False)
        give_up_at = None if self.shape.give_up_after_s is None else loop.time() + self.shape.give_up_after_s
        try:
            await loop.sock_connect(sock, self._address)
            await loop.sock_sendall(sock, payload)
            while give_up_at is None or loop.time() < give_up_at:
                await asyncio.sleep(self.shape.read_every_s)
                data = await loop.sock_recv(sock, self.shape.read_bytes)
                if not data:
                    self.num_ended_by_server += 1  # read to the end: the server finished first
                    return
                self.num_bytes_read += len(data)
        except OSError:
            return
        finally:
            sock.close()

    async def _open_clients(self) -> None:
        start = asyncio.get_running_loop().time()
        for offset_s in iter_arrival_offsets(self.shape.arrival_rate_per_s, seed=3):
            await asyncio.sleep(max(0.0, start + offset_s - asyncio.get_running_loop().time()))
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.create_task(self._client(self._request_bytes())))
            self.num_clients += 1

    async def inject(self) -> None:
        self._opener = asyncio.create_task(self._open_clients())

    async def remove(self) -> None:
        tasks = [t for t in (self._opener, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._opener, self._tasks = None, []

    async def close(self) -> str | None:
        await self.remove()
        return (f"slow readers: {self.num_clients} clients, {self.num_ended_by_server} of them saw the server end "
                f"their stream, {self.num_bytes_read} bytes read in all")


class BackendKill:
    """SIGKILL one backend behind the gateway (a crashed or OOM-killed replica); removal starts
    it again on the same port, as a supervisor would."""

    def __init__(self, victim: ServerProcess) -> None:
        self.victim = victim
        self.description = f"SIGKILL of {victim.name} ({victim.url}); restarted on the same port at removal"
        self._restart: asyncio.Task | None = None

    async def inject(self) -> None:
        await asyncio.to_thread(self.victim.kill)

    async def remove(self) -> None:
        # Started in the background: the harness's clock goes on while the model loads.
        self._restart = asyncio.create_task(asyncio.to_thread(self.victim.start))

    async def close(self) -> str | None:
        """Wait for the restart; a note when the victim did not come back."""
        if self._restart is None:
            return None
        try:
            await self._restart
        except RuntimeError as exc:
            return f"the killed backend did not come back: {str(exc).splitlines()[0]}"
        return None


@dataclass(frozen=True)
class FaultLoads:
    """The model-specific sizes: a steady load at about half of what the machine serves, and
    faults big enough to matter on it."""

    steady: LoadShape
    long_prompts: LoadShape  # the flood, on top of the steady load
    kv_squeeze: LoadShape  # long outputs on top of the steady load, on the small-KV server
    small_kv_tokens: int  # KV capacity of the small_kv server: the steady load fits, with the squeeze it does not
    small_kv_max_model_len: int
    slow_readers: SlowReaderShape = SlowReaderShape()
    cpu_hog_processes: int = 2


# Sized on a 2-core x86 machine (docs/bench.md, "Fault injection").
PRESETS = {
    "demo": FaultLoads(
        steady=LoadShape(request_rate=4.0, input_len=128, output_len=64),
        # Longest prompt 875 tokens (+8% when the random ids' text is re-encoded) + 8: within the
        # demo model's 1024 positions.
        long_prompts=LoadShape(request_rate=4.0, input_len=700, output_len=8, seed=1),
        kv_squeeze=LoadShape(request_rate=2.0, input_len=200, output_len=560, seed=2),
        small_kv_tokens=4096, small_kv_max_model_len=1024),
    "default": FaultLoads(
        steady=LoadShape(request_rate=1.0, input_len=128, output_len=64),
        long_prompts=LoadShape(request_rate=1.0, input_len=1536, output_len=8, seed=1),
        kv_squeeze=LoadShape(request_rate=0.5, input_len=256, output_len=512, seed=2),
        small_kv_tokens=4096, small_kv_max_model_len=2048,
        slow_readers=SlowReaderShape(arrival_rate_per_s=0.5, max_tokens=1024, give_up_after_s=1.5)),
}
