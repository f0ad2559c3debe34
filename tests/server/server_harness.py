"""A real tokenmill server on loopback, run by uvicorn in a background thread, or as its
own process (`ServedProcess`, for signals, exit codes and logs; the benches use it too).

One server per test module (module-scoped fixtures in conftest.py): starting and stopping
one takes ~0.2 s on the tiny checkpoints, so tests share it to keep the suite quick.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from tokenmill.config import create_engine_config
from tokenmill.server.api_server import HTTP_PARSER, ServerState, build_app
from tokenmill.server.args import ServerSettings

MODEL_NAME = "tiny-llama"
# The most any test waits for a response or a condition. A ceiling against hanging, never an
# expectation: on a loaded 2-core machine a request can take many times its usual time.
CEILING_S = 300.0


@dataclass
class RunningServer:
    url: str
    state: ServerState
    server: uvicorn.Server

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=CEILING_S, **kwargs)


@contextmanager
def running_server(model_dir, settings: ServerSettings | None = None, **engine_kwargs) -> Iterator[RunningServer]:
    engine_kwargs.setdefault("dtype", "float32")
    engine_kwargs.setdefault("num_kv_blocks", 256)
    config = create_engine_config(str(model_dir), **engine_kwargs)
    settings = settings or ServerSettings(served_model_names=(MODEL_NAME,))
    app = build_app(config, settings)
    # Bound here and handed over, so there is no race for a free port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, http=HTTP_PARSER))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + CEILING_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app.state.server, server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedProcess:
    """`python -m tokenmill.server --model MODEL ARGS...` on a free port, up and healthy."""

    def __init__(self, model, *args: str, capture_log: bool = True) -> None:
        """Args:
            capture_log: keep the server's log for `stop()` (else it is discarded; a long run
                that logs every request would fill the pipe).
        """
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        cmd = [sys.executable, "-m", "tokenmill.server", "--model", str(model), "--port", str(port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture_log else subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 2 * CEILING_S  # the first start may also build the CPU kernels
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start:\n" + (self.proc.stdout.read() if capture_log else ""))
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=CEILING_S).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> str:
        """Wait for the exit, assert it is 0, and return the log."""
        assert self.proc.wait(timeout=CEILING_S) == 0
        return self.proc.stdout.read() if self.proc.stdout else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def _samples(text: str, name: str, labels: dict[str, str]):
    """The values of `name`'s samples in a Prometheus exposition whose labels include `labels`."""
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(?:\{([^}]*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            yield float(m.group(3))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (labels must match a subset)."""
    for value in _samples(text, name, labels):
        return value
    raise KeyError(f"{name} {labels} not in /metrics")


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample whose labels include `labels` (0 when there is none yet:
    a labelled counter has no sample before its first increment)."""
    return sum(_samples(text, name, labels))


def wait_until(predicate, timeout: float = CEILING_S, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def serve_real_model() -> Iterator[RunningServer]:
    """A server on the real default model (SmolLM2-135M-Instruct GGUF). A module that runs
    on it makes this its `server`:
    `server = pytest.fixture(serve_real_model, scope="module", name="server")`."""
    from tests.model.gguf_factory import real_model_path

    with running_server(real_model_path(), max_model_len=2048, num_kv_blocks=512) as s:
        yield s
