"""A local two-node Ray cluster (a head and a worker, each `ray start --block` in its own
process on this machine, one logical CPU each) and `tokenmill serve --ray` on it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.gateway.harness import Process
from tests.server.server_harness import CEILING_S, free_port, metric

RAY_BIN = Path(sys.executable).with_name("ray")
# Hermetic: without this, a token that an earlier local `ray.init()` left in ~/.ray/auth_token
# turns token authentication on for `ray start`, and the tests' clients are refused.
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
# Small object stores: requests and responses are a few KB, and the default takes 30% of RAM.
STORE_BYTES = str(100 * 2**20)


class RayCluster:
    """Head and worker nodes; `stop()` ends exactly these processes (never `ray stop`, which
    would end every Ray instance of the machine)."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="tmray")
        common = [str(RAY_BIN), "start", "--block", f"--num-cpus={cpus_per_node}", "--disable-usage-stats",
                  f"--object-store-memory={STORE_BYTES}"]
        self._log = open(Path(self.tmp) / "nodes.log", "w")
        self.nodes = [subprocess.Popen([*common, "--head", f"--port={self.port}", "--include-dashboard=false",
                                        f"--temp-dir={self.tmp}"], stdout=self._log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=RAY_ENV)]
        self._wait_for_head()
        self.nodes.append(subprocess.Popen([*common, f"--address={self.address}"], stdout=self._log,
                                           stderr=subprocess.STDOUT, start_new_session=True, env=RAY_ENV))

    def _wait_for_head(self) -> None:
        deadline = time.monotonic() + CEILING_S
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.nodes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Ray head did not start:\n" + self.log())
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return (Path(self.tmp) / "nodes.log").read_text()

    def stop(self) -> None:
        # Each node's processes (GCS, raylet, workers) share its session's process group;
        # SIGTERM to `ray start --block` takes up to a minute to wind them down, for nothing.
        for proc in reversed(self.nodes):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class RayServe(Process):
    """`tokenmill serve --ray ARGS` against `cluster`, up once a replica answers
    /v1/models. Its application has a name of its own, so `replica_pids` finds exactly its
    replicas (never another Ray instance's on this machine)."""

    def __init__(self, cluster: RayCluster, *args: str) -> None:
        port = free_port()
        self.app_name = f"tm-test-{port}"
        cmd = [sys.executable, "-m", "tokenmill", "serve", "--ray", "--port", str(port), "--ray-app-name",
               self.app_name, "--ray-proxy-location", "HeadOnly", *args]  # one proxy: the nodes share this host
        # Stopping deletes the application (replicas shut down gracefully): up to a minute.
        super().__init__(cmd, f"http://127.0.0.1:{port}", Path(cluster.tmp) / f"serve-{port}.log",
                         ready_path="/v1/models", start_timeout_s=2 * CEILING_S, stop_timeout_s=CEILING_S,
                         env={**RAY_ENV, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"})

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=CEILING_S).text

    def replicas(self, text: str | None = None) -> set[str]:
        """The engine replicas the ingress's /metrics reports (those alive and registered)."""
        text = self.metrics() if text is None else text
        return {line.split('replica="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                if line.startswith("tokenmill:num_requests_running{")}

    def per_replica(self, name: str, **labels: str) -> dict[str, float]:
        """One sample's value on each replica."""
        text = self.metrics()
        return {r: metric(text, name, replica=r, **labels) for r in self.replicas(text)}

    def replica_pids(self) -> list[int]:
        """PIDs of this application's engine replicas (Ray titles each worker process
        `ray::ServeReplica:<app>:<deployment>`)."""
        out = subprocess.run(["pgrep", "-f", f"ServeReplica:{self.app_name}:TokenmillEngine"],
                             capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]
