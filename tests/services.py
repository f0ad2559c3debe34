"""Real servers on loopback for the tests: Redis and PostgreSQL (the gateway), Prometheus (metrics).

Each server runs from the Debian package's binaries on a free port, with its state in a
temporary directory, and is stopped and removed when its context manager exits. Fakes would
hide exactly what the gateway needs tested: the wire protocol, transactions and concurrency.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import redis

START_TIMEOUT_S = 60.0  # a ceiling for slow CI machines; both start in about a second
STOP_TIMEOUT_S = 30.0


class ServiceUnavailable(Exception):
    """The server cannot run on this machine (its binaries are missing); tests skip."""


def free_port() -> int:
    """A port the kernel just reported free; another process could take it before we bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child just before exec (after its user switch, which would clear it): a
    # killed pytest then takes its servers down too, instead of leaking them across runs.
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_until_ready(proc: subprocess.Popen, log: Path, probe: Callable[[], object]) -> None:
    """Polls `probe` until it stops raising; fails early when the server has exited."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            probe()
            return
        except Exception as exc:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()}"
                ) from exc
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{proc.args[0]} not ready after {START_TIMEOUT_S:.0f} s:\n{log.read_text()}"
                ) from exc
            time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Starts redis-server on a free loopback port; yields "redis://127.0.0.1:PORT/0"."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable("redis-server not found; install the Debian package redis-server")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory(prefix="tokenmill-redis-") as tmp:
        log = Path(tmp, "redis.log")
        # No snapshots and no append-only file: nothing to write, so nothing to wait for.
        # --dir keeps any stray file out of the working tree anyway.
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", tmp]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)  # fmt: skip
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            with client:
                _wait_until_ready(proc, log, client.ping)
            yield url
        finally:
            _stop(proc, signal.SIGTERM)


def _postgres_bin_dir() -> Path:
    """The directory of initdb and postgres: PATH first, else the newest Debian version."""
    on_path = [shutil.which(name) for name in ("initdb", "postgres")]
    if all(on_path):
        return Path(on_path[0]).resolve().parent
    # Debian installs them outside PATH, under /usr/lib/postgresql/<major>/bin.
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    candidates = [d for d in candidates if (d / "initdb").exists()]
    if not candidates:
        raise ServiceUnavailable("initdb/postgres not found; install the Debian package postgresql")
    return max(candidates, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Starts a throwaway PostgreSQL cluster on a free loopback port with database tokenmill.

    Yields "postgresql://postgres@127.0.0.1:PORT/tokenmill" (trust auth, no password).
    """
    bin_dir = _postgres_bin_dir()
    # PostgreSQL refuses to run as root, so under root both initdb and the server run as the
    # `postgres` system user (created by the Debian package), owning the temp directory.
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceUnavailable(
                "running as root needs the postgres system user; "
                "install the Debian package postgresql"
            ) from None
        run_as = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-pg-"))
    try:
        if run_as:
            os.chown(tmp, run_as["user"], run_as["group"])
        data, log = tmp / "data", tmp / "postgres.log"
        # --no-sync: the cluster is thrown away, durability buys nothing. The C locale avoids
        # depending on the container's locales (often none besides C).
        initdb = subprocess.run(
            [bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--locale=C", "--no-sync", "--no-instructions"],
            cwd=tmp, capture_output=True, text=True, **run_as,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
        # The Unix socket goes into tmp, not /var/run/postgresql (which may not exist);
        # clients use TCP. fsync=off for speed, as above.
        args = [bin_dir / "postgres", "-D", data, "-p", str(port), "-k", tmp,
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent, **run_as)  # fmt: skip
        try:
            admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"

            def connect() -> psycopg.Connection:
                return psycopg.connect(admin, connect_timeout=2, autocommit=True)

            _wait_until_ready(proc, log, lambda: connect().close())
            with connect() as conn:
                conn.execute("CREATE DATABASE tokenmill")
            yield f"postgresql://postgres@127.0.0.1:{port}/tokenmill"
        finally:
            # SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients instead of
            # waiting for them (SIGTERM, "smart", would wait on any leaked connection).
            _stop(proc, signal.SIGINT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def prometheus_server(targets: list[str], scrape_interval_s: float = 1.0) -> Iterator[str]:
    """A Prometheus server (Debian's `prometheus`) scraping `targets` ("host:port", path
    /metrics); yields its URL for the HTTP API (`/api/v1/query`)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ServiceUnavailable("prometheus is not installed (Debian package prometheus)")
    import httpx

    with tempfile.TemporaryDirectory(prefix="tm-prometheus-") as tmp:
        config = Path(tmp, "prometheus.yml")
        config.write_text(
            "global:\n"
            f"  scrape_interval: {round(scrape_interval_s * 1000)}ms\n"
            "scrape_configs:\n"
            "  - job_name: tokenmill\n"
            f"    static_configs:\n      - targets: [{', '.join(repr(t) for t in targets)}]\n")
        port = free_port()
        log = Path(tmp, "prometheus.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(proc, log, lambda: httpx.get(url + "/-/ready", timeout=1).raise_for_status())
            yield url
        finally:
            _stop(proc, signal.SIGTERM)
