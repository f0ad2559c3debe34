"""Real processes on loopback for the gateway tests: fake OpenAI backends, tokenmill
servers on the demo model, and gateways in front of them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.server.server_harness import CEILING_S, free_port

ADMIN_KEY = "sk-admin-test"
PYTHON_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Process:
    """A child process, up once GET `ready_path` answers 200; SIGTERM stops it."""

    def __init__(self, cmd: list[str], url: str, log: Path | None = None, *, ready_path: str = "/health",
                 env: dict[str, str] = PYTHON_ENV, start_timeout_s: float = CEILING_S,
                 stop_timeout_s: float = 30.0) -> None:
        self.url, self._ready_path, self._stop_timeout_s = url, ready_path, stop_timeout_s
        self.log_path = log or Path(tempfile.mkstemp(suffix=".log")[1])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{' '.join(cmd)} did not start:\n{self.log()[-5000:]}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + self._ready_path, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def fake_backend(*args: str) -> Process:
    port = free_port()
    return Process([sys.executable, "-m", "tokenmill.bench.fake_server", "--port", str(port), *args],
                   f"http://127.0.0.1:{port}")


def tokenmill_backend(model_dir, *args: str) -> Process:
    port = free_port()
    return Process([sys.executable, "-m", "tokenmill.server", "--model", str(model_dir), "--port", str(port),
                    "--served-model-name", "demo", "--dtype", "float32", *args], f"http://127.0.0.1:{port}")


def gateway(backends: list[str], db: Path, *args: str) -> Process:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill", "gateway", "serve", "--port", str(port), "--db", str(db),
           "--admin-key", ADMIN_KEY, "--health-interval", "0.2"]
    for b in backends:
        cmd += ["--backend", b]
    return Process([*cmd, *args], f"http://127.0.0.1:{port}")


def create_key(gw_url: str, **fields) -> str:
    r = httpx.post(gw_url + "/key/generate", json=fields, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["key"]


def admin(gw_url: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, gw_url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
