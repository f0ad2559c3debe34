"""Bursts of non-streaming requests against a real `tokenmill serve` (bundled demo model,
default capacity 256 running + 256 waiting): how many are admitted, how many get 503, what
the 503 says and what /metrics shows.

    python tests/server/bench_burst.py                 # bursts of 500 and 300
    python tests/server/bench_burst.py --bursts 600 --serve-arg=--max-waiting-requests=64

Each request asks for more tokens than the burst takes to send, so none finishes (and frees
its place) before the last one is admitted or refused; the admitted ones are then cancelled.
Not a test: the point is the numbers in docs/server.md (tests/server/test_admission.py
asserts the same on a small capacity).
"""

from __future__ import annotations

import argparse
import asyncio
import collections

import httpx
from server_harness import ServedProcess

from tokenmill.config import DEMO_MODEL_DIR


def _gauge(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


async def burst(url: str, model: str, num_requests: int) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        body = {"model": model, "prompt": "ROMEO:", "max_tokens": 900, "ignore_eos": True}
        tasks = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(num_requests)]
        refused: list[httpx.Response] = []
        # Every request is accounted for once the refused ones and those in the engine add up.
        while True:
            done = [t for t in tasks if t.done()]
            refused = [t.result() for t in done if not t.exception() and t.result().status_code == 503]
            # A new connection per poll: a kept-alive one can be closed by the server under it.
            metrics = (await c.get("/metrics", headers={"Connection": "close"})).text
            in_engine = _gauge(metrics, "tokenmill:num_requests_running") + _gauge(metrics, "tokenmill:num_requests_waiting")
            if len(refused) + in_engine >= num_requests:
                break
            await asyncio.sleep(0.2)
        statuses = collections.Counter(t.result().status_code for t in tasks if t.done() and not t.exception())
        print(f"burst of {num_requests}: {int(in_engine)} admitted "
              f"(running {int(_gauge(metrics, 'tokenmill:num_requests_running'))}, "
              f"waiting {int(_gauge(metrics, 'tokenmill:num_requests_waiting'))}), "
              f"{len(refused)} x 503; finished meanwhile: {dict(statuses)}")
        if refused:
            print("  503 says:", refused[0].json()["error"]["message"])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Let the aborts reach the engine before the next burst.
    async with httpx.AsyncClient(base_url=url) as c:
        while _gauge((await c.get("/metrics")).text, "tokenmill:num_requests_running") > 0:
            await asyncio.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO_MODEL_DIR)
    ap.add_argument("--bursts", type=int, nargs="+", default=[500, 300])
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `tokenmill serve` option")
    args = ap.parse_args()
    with ServedProcess(args.model, "--uvicorn-log-level", "warning", "--disable-log-requests", *args.serve_arg,
                       capture_log=False) as served:
        model = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
        for n in args.bursts:
            asyncio.run(burst(served.url, model, n))


if __name__ == "__main__":
    main()
