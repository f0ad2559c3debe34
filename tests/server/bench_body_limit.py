"""One huge request against a real `tokenmill serve`: how long until the client gets its 4xx,
how much memory the server took, and whether a small request is served meanwhile.

    python tests/server/bench_body_limit.py                # 50 MB prompt, bundled demo model
    python tests/server/bench_body_limit.py --mb 8 --serve-arg=--max-request-body-bytes=16000000
    python tests/server/bench_body_limit.py --mb 1 --path /tokenize   # a long tokenization

Peak memory is the server process's VmHWM (Linux's exact high-water mark of resident memory).
Not a test: the point is the numbers in docs/server.md.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx
from server_harness import ServedProcess

from tokenmill.config import DEMO_MODEL_DIR


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO_MODEL_DIR)
    ap.add_argument("--mb", type=float, default=50.0, help="prompt size in MB (default: 50)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `tokenmill serve` option")
    ap.add_argument("--path", default="/v1/completions", choices=["/v1/completions", "/tokenize"])
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    with ServedProcess(args.model, "--uvicorn-log-level", "warning", *args.serve_arg, capture_log=False) as served:
        url, proc = served.url, served.proc
        rss_idle = _rss_mb(proc.pid, "VmRSS")
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        big = {"model": model, "prompt": "ROMEO: " * int(args.mb * 1e6 / 7)}
        body = json.dumps(big if args.path == "/tokenize" else {**big, "max_tokens": 1}).encode()
        # A 2,400-character prompt sent meanwhile (a tokenizer thread's job): is it held up?
        small = {"model": model, "prompt": "JULIET: " * 300, "max_tokens": 1}
        small_times: list[float] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                t = time.monotonic()
                httpx.post(url + "/v1/completions", json=small, timeout=args.timeout)
                small_times.append(time.monotonic() - t)
                time.sleep(0.2)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        start = time.monotonic()
        try:
            resp = httpx.post(url + args.path, content=body, timeout=args.timeout,
                              headers={"content-type": "application/json"})
            outcome = f"HTTP {resp.status_code}: {resp.text[:100]}"
        except httpx.HTTPError as e:
            outcome = f"{type(e).__name__}: {e}"
        elapsed = time.monotonic() - start
        done.set()
        prober.join()
        print(f"request body: {len(body) / 1e6:.1f} MB")
        print(f"answer after {elapsed:.2f} s: {outcome}")
        print(f"server resident memory: {rss_idle:.0f} MB idle, peak {_rss_mb(proc.pid, 'VmHWM'):.0f} MB")
        if small_times:
            print(f"small requests meanwhile: {len(small_times)}, slowest {max(small_times):.2f} s")


if __name__ == "__main__":
    main()
