"""A server subprocess on a free loopback port, for measurements that need a real server.

`bench reference` measures its served rows against `tokenmill serve`; scripts/bench_peers.py
runs llama.cpp's llama-server beside it; the end-to-end bench tests use it too.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import httpx

SERVER_START_TIMEOUT_S = 600.0  # model load + warm-up of a 1B model on a loaded 2-core CPU
SERVER_STOP_TIMEOUT_S = 60.0  # graceful drain after SIGTERM before the server is killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tokenmill_server(model_dir: str, serve_args: Sequence[str] = (),
                     start_timeout_s: float = SERVER_START_TIMEOUT_S) -> Iterator[str]:
    """Run `tokenmill serve --model model_dir` until the block ends.

    Args:
        model_dir: checkpoint folder or GGUF file.
        serve_args: further `tokenmill serve` flags, e.g. ["--dtype", "bfloat16"].
        start_timeout_s: how long the server may take to answer GET /health.

    Returns:
        A context manager yielding the server's base URL (http://127.0.0.1:PORT).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--model", model_dir, *serve_args,
           "--host", "127.0.0.1", "--port", str(port)]
    with server_command(cmd, port, "tokenmill serve", start_timeout_s) as base:
        yield base


@contextmanager
def server_command(cmd: Sequence[str], port: int, name: str,
                   start_timeout_s: float = SERVER_START_TIMEOUT_S) -> Iterator[str]:
    """Run any OpenAI-compatible server (`cmd` must make it listen on 127.0.0.1:port, e.g.
    llama.cpp's llama-server) until the block ends; stopped with SIGTERM, killed if it
    has not exited after SERVER_STOP_TIMEOUT_S.

    Returns:
        A context manager yielding the base URL once GET /health answers 200.

    Raises:
        RuntimeError: the server exited or was not healthy in time; the message holds the
            tail of its output (which is otherwise kept out of the caller's terminal).
    """
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(proc, base, log, name, start_timeout_s)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: the server drains, then exits
            try:
                proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(proc: subprocess.Popen, base: str, log: IO[bytes], name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "is not healthy in time"
            raise RuntimeError(f"{name} {state}:\n{tail}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
