"""The gateway's overhead numbers in docs/gateway.md that `tokenmill bench gateway` does not give.

    python scripts/gateway_overheads.py clients              # httpx vs aiohttp, µs per sequential request
    python scripts/gateway_overheads.py cpu [GATEWAY FLAGS]  # gateway CPU per request, e.g. --access-log off

Both start the fake backend (and for `cpu` a gateway) as processes on free loopback ports.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

import aiohttp
import httpx

from tokenmill.bench.server_process import free_port

BODY = {"model": "fake", "prompt": "hello world", "max_tokens": 16}


def _start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not start")


def _fake() -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return _start([sys.executable, "-m", "tokenmill.bench.fake_server", "--port", str(port)], url), url


async def _clients(url: str, n: int = 2000) -> None:
    async def with_httpx() -> float:
        async with httpx.AsyncClient() as c:
            t = time.perf_counter()
            for _ in range(n):
                (await c.post(url, json=BODY)).read()
            return (time.perf_counter() - t) / n

    async def with_aiohttp() -> float:
        async with aiohttp.ClientSession() as s:
            t = time.perf_counter()
            for _ in range(n):
                async with s.post(url, json=BODY) as r:
                    await r.read()
            return (time.perf_counter() - t) / n

    for f in (with_httpx, with_aiohttp, with_httpx, with_aiohttp):  # alternated; the first of each warms up
        print(f"{f.__name__}: {await f() * 1e6:.0f} us per request")


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, key: str, n: int, in_flight: int = 8) -> None:
    async with aiohttp.ClientSession() as s:
        async def worker() -> None:
            for _ in range(n // in_flight):
                async with s.post(url + "/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
        await asyncio.gather(*(worker() for _ in range(in_flight)))


def main(argv: list[str]) -> None:
    mode, gateway_flags = (argv[0] if argv else "cpu"), argv[1:]
    fake, fake_url = _fake()
    try:
        if mode == "clients":
            asyncio.run(_clients(fake_url + "/v1/completions"))
            return
        port = free_port()
        gw_url = f"http://127.0.0.1:{port}"
        db = os.path.join(tempfile.mkdtemp(), "keys.db")
        gw = _start([sys.executable, "-m", "tokenmill", "gateway", "serve", "--backend", fake_url, "--port", str(port),
                     "--admin-key", "admin", "--db", db, *gateway_flags], gw_url)
        try:
            key = httpx.post(gw_url + "/key/generate", headers={"Authorization": "Bearer admin"},
                             json={"rpm_limit": 10**8}).json()["key"]
            asyncio.run(_load(gw_url, key, 2000))  # warm-up
            c0, t0 = _cpu_s(gw.pid), time.perf_counter()
            asyncio.run(_load(gw_url, key, 8000))
            print(f"gateway CPU {(_cpu_s(gw.pid) - c0) / 8000 * 1e6:.0f} us per request, "
                  f"{8000 / (time.perf_counter() - t0):.0f} req/s (8 in flight) {' '.join(gateway_flags)}")
        finally:
            gw.terminate()
    finally:
        fake.terminate()


if __name__ == "__main__":
    main(sys.argv[1:])
