"""tokenmill serve and llama.cpp's llama-server on the same GGUF file, side by side.

Each server runs alone on the machine (one at a time, so they never share the cores) and is
driven by the bench lab's closed-loop client (`bench serve`): distinct random prompts of
exactly --input-len tokens sent as token ids, --output-len greedy tokens with ignore_eos,
2 x concurrency requests (4 at concurrency 1) after one warm-up. Every run is stored in the
bench history (label "peers"); the table printed at the end is output tokens/s.

    python scripts/bench_peers.py --llama-server PATH/TO/llama-server
    python scripts/bench_peers.py --llama-server ... --concurrency 1,16,64 --passes 2

llama-server is built from the llama-cpp-python source distribution (docs/performance.md,
"Against llama.cpp"). Its flags here: --threads N --threads-batch N (the machine's cores by
default), --parallel (the largest concurrency) slots of --ctx-per-slot tokens, continuous
batching (its default); --llama-arg passes more (e.g. --llama-arg=-fa --llama-arg=on).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

from tokenmill.bench.schema import LoadSpec
from tokenmill.bench.serve import ServeSpec, run_serve
from tokenmill.bench.server_process import free_port, server_command, tokenmill_server
from tokenmill.bench.store import Store
from tokenmill.bench.workloads import WorkloadSpec
from tokenmill.model.default_model import default_model_path

LABEL = "peers"


def _llama_server(args: argparse.Namespace, slots: int):
    port = free_port()
    cmd = [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(args.threads), "--threads-batch", str(args.threads),
           "--parallel", str(slots), "--ctx-size", str(slots * args.ctx_per_slot), *args.llama_arg]
    return server_command(cmd, port, "llama-server")


def _tokenmill_server(args: argparse.Namespace, slots: int):
    return tokenmill_server(args.model, ["--max-num-seqs", str(slots), "--max-model-len", str(args.ctx_per_slot),
                                         *args.tokenmill_arg])


def _measure(base: str, args: argparse.Namespace, concurrency: int, server: str, series: str,
             store: Store) -> float:
    num_prompts = 2 * concurrency if concurrency > 1 else 4
    workload = WorkloadSpec("random", random_input_len=args.input_len, random_output_len=args.output_len,
                            random_range_ratio=0.0, prompt_format="token-ids", seed=args.seed)
    load = LoadSpec(max_concurrency=concurrency, num_prompts=num_prompts, num_warmups=1, seed=args.seed)
    spec = ServeSpec(base_url=base, workload=workload, load=load, tokenizer_path=args.model, ignore_eos=True,
                     temperature=0.0, label=f"{LABEL} {server}", series=series, show_progress=False)
    t0 = time.perf_counter()
    outcome = run_serve(spec, store)
    s = outcome.summary
    print(f"  {server}, {concurrency} streams: {s.output_throughput:,.1f} output tok/s, TTFT p50 "
          f"{s.ttft.median_ms:,.0f} ms, {s.num_completed} ok / {s.num_failed} failed "
          f"({time.perf_counter() - t0:.0f} s, run {outcome.record.id})", file=sys.stderr, flush=True)
    if s.num_failed:
        raise SystemExit(f"{server}: {s.num_failed} requests failed at concurrency {concurrency}")
    return s.output_throughput


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--llama-server", required=True, help="Path of llama.cpp's llama-server binary.")
    p.add_argument("--model", default=None, help="GGUF file both servers load (default: the default model).")
    p.add_argument("--concurrency", default="1,16,64", help="Concurrent streams, comma-separated.")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ctx-per-slot", type=int, default=512, help="Context per stream (tokenmill --max-model-len).")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server threads (default: all cores).")
    p.add_argument("--passes", type=int, default=1, help="Repeat everything; the table shows medians.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-arg", action="append", default=[], help="Extra llama-server flag (repeatable).")
    p.add_argument("--tokenmill-arg", action="append", default=[], help="Extra tokenmill serve flag (repeatable).")
    p.add_argument("--db", default=None, help="Bench history file (default: tokenmill bench's).")
    args = p.parse_args()
    args.model = args.model or default_model_path()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    servers = {"tokenmill": _tokenmill_server, "llama.cpp": _llama_server}
    series = f"peers-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    results: dict[str, dict[int, list[float]]] = {name: {c: [] for c in concurrencies} for name in servers}
    with Store(args.db) as store:
        for n in range(args.passes):
            for name, start in servers.items():
                print(f"pass {n + 1}/{args.passes}: starting {name} on {os.path.basename(args.model)}",
                      file=sys.stderr, flush=True)
                with start(args, max(concurrencies)) as base:
                    for c in concurrencies:
                        results[name][c].append(_measure(base, args, c, name, series, store))
    print(f"\nOutput tok/s, {args.input_len} prompt + {args.output_len} output tokens, greedy, ignore_eos; "
          f"median of {args.passes} pass(es); series {series}\n")
    print("| server | " + " | ".join(f"{c} streams" for c in concurrencies) + " |")
    print("|---|" + "---:|" * len(concurrencies))
    med = {name: {c: statistics.median(v) for c, v in per.items()} for name, per in results.items()}
    for name in servers:
        print(f"| {name} | " + " | ".join(f"{med[name][c]:,.1f}" for c in concurrencies) + " |")
    print("| tokenmill / llama.cpp | " + " | ".join(f"{med['tokenmill'][c] / med['llama.cpp'][c]:.2f}x"
                                                  for c in concurrencies) + " |")


if __name__ == "__main__":
    main()
