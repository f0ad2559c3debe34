"""Does the engine loop stall the HTTP event loop? A side-by-side measurement.

    python tests/server/bench_overlap.py [--arch smollm2-135m | --model DIR] [--streams 32]

For each mode, a real server process serves N concurrent streaming completions (token-id
prompts, ignore_eos, fixed length) while a prober GETs /health every 20 ms. Reported:
generated tokens/s, /health latency (how long an HTTP request waits for the event loop),
client-side time to first token and gaps between streamed chunks.

Modes:
  thread  the shipped AsyncLLM: EngineCore.step() runs in a background thread.
  inline  the same engine stepped on the event loop itself (one step per loop iteration),
          the simplest alternative: no thread, no GIL hand-offs, but HTTP waits for each step.

Not a test (pytest does not collect it); results are written down in docs/server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from tokenmill.config import create_engine_config
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.server.api_server import build_app
    from tokenmill.server.args import ServerSettings

    class InlineAsyncLLM(AsyncLLM):
        """AsyncLLM whose steps run as an asyncio task on the event loop thread."""

        def start(self) -> None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run_inline())

        async def _run_inline(self) -> None:
            while not self._stopping.is_set():
                if not self.core.has_unfinished_requests() and self._commands.empty():
                    await asyncio.sleep(0.001)
                    continue
                self._drain_commands(block=False)
                outputs = self.core.step()
                self.stats = self.core.stats()
                if outputs:
                    self._deliver(outputs)
                await asyncio.sleep(0)  # let HTTP run between steps

        @property
        def is_alive(self) -> bool:
            return self._task is not None and not self._task.done()

        _task = None

        def shutdown(self) -> None:
            self._stopping.set()

    if args.mode.startswith("thread-"):  # e.g. thread-0.5: GIL switch interval in ms
        sys.setswitchinterval(float(args.mode.split("-")[1]) / 1e3)
    config = create_engine_config(args.model, dtype=args.dtype, num_kv_blocks=args.num_kv_blocks)
    engine = (InlineAsyncLLM if args.mode == "inline" else AsyncLLM)(config)
    app = build_app(config, ServerSettings(served_model_names=("m",), log_requests=False), engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


async def _load(url: str, num_streams: int, max_tokens: int, prompt_len: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=200)) as c:
        await c.post("/v1/completions", json={"prompt": [5] * 8, "max_tokens": 4})  # warm up
        health_ms: list[float] = []
        ttft_ms: list[float] = []
        gaps_ms: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await c.get("/health")
                health_ms.append((time.perf_counter() - t) * 1e3)
                await asyncio.sleep(0.02)

        async def stream(i: int) -> int:
            # Distinct prompts, so the prefix cache does not shorten anyone's prefill.
            prompt = [(7 * i + j) % 250 + 3 for j in range(prompt_len)]
            body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                    "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True}}
            start = last = time.perf_counter()
            tokens = 0
            async with c.stream("POST", "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if event["choices"]:
                        if last == start:
                            ttft_ms.append((now - start) * 1e3)
                        else:
                            gaps_ms.append((now - last) * 1e3)
                        last = now
                    else:
                        tokens = event["usage"]["completion_tokens"]
            return tokens

        prober = asyncio.ensure_future(probe())
        start = time.perf_counter()
        counts = await asyncio.gather(*(stream(i) for i in range(num_streams)))
        elapsed = time.perf_counter() - start
        done.set()
        await prober

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs or [0.0])[0]

    return {
        "tokens_per_s": sum(counts) / elapsed,
        "health_p50_ms": pct(health_ms, 50), "health_p99_ms": pct(health_ms, 99), "health_max_ms": max(health_ms),
        "ttft_p50_ms": pct(ttft_ms, 50), "chunk_gap_p50_ms": pct(gaps_ms, 50), "chunk_gap_p99_ms": pct(gaps_ms, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: built from --arch)")
    p.add_argument("--arch", default="smollm2-135m", help="tokenmill.bench.model_configs name")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--modes", default="thread,inline",
                   help="comma-separated; thread-X = thread with a GIL switch interval of X ms")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all modes, interleaved so machine noise hits each alike; medians reported")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="thread", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        _serve(args)
        return
    if args.model is None:
        from tokenmill.bench.model_configs import cached_checkpoint

        args.model = str(cached_checkpoint(args.arch))
    results: dict[str, list[dict]] = {}
    for mode in args.modes.split(",") * args.repeat:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, __file__, "--serve", "--mode", mode, "--port", str(port), "--model", args.model,
               "--dtype", args.dtype, "--num-kv-blocks", str(args.num_kv_blocks)]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            result = asyncio.run(_load(url, args.streams, args.max_tokens, args.prompt_len))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        results.setdefault(mode, []).append(result)
        print(mode, json.dumps({k: round(v, 1) for k, v in result.items()}), flush=True)
    if args.repeat > 1:
        for mode, runs in results.items():
            medians = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
            print("median", mode, json.dumps(medians), flush=True)


if __name__ == "__main__":
    main()
