"""A `tokenmill serve` subprocess on a free loopback port, for measurements that need a real server.

`bench reference` measures its served rows against one; the end-to-end bench tests use it too.
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
        model_dir: checkpoint folder.
        serve_args: further `tokenmill serve` flags, e.g. ["--dtype", "bfloat16"].
        start_timeout_s: how long the server may take to answer GET /health.

    Returns:
        A context manager yielding the server's base URL (http://127.0.0.1:PORT).

    Raises:
        RuntimeError: the server exited or was not healthy in time; the message holds the
            tail of its output (which is otherwise kept out of the caller's terminal).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--model", model_dir, *serve_args,
           "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, base, log, start_timeout_s)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: the server drains, then exits
            try:
                proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, base: str, log: IO[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "is not healthy in time"
            raise RuntimeError(f"tokenmill serve {state}:\n{tail}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
