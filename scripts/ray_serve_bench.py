"""The Ray Serve numbers in docs/deploy.md, in one run on this machine:

    python scripts/ray_serve_bench.py [--model PATH] [--num-prompts 64] [--concurrency 8]

Setups, one after the other: `tokenmill serve` directly with one thread (OMP_NUM_THREADS=1,
as a Ray replica with num_cpus=1 gets); `tokenmill serve --ray` with 1 and 2 replicas
(num_cpus=1 each; a local Ray instance); 2 replicas without stream batching. Each is
measured by the bench lab (`tokenmill bench serve`):
- overhead: 100 tiny requests (8 tokens in, 1 out) one at a time: what the Ray path (Serve's
  proxy, the ingress, the handle call, the relay) adds to a request;
- latency: concurrency 1, 128 tokens in, 64 out;
- throughput: --concurrency, 128 in, 64 out; with the CPU seconds each group of processes
  spent per 1,000 output tokens (from /proc).
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.bench.server_process import free_port

TOKENMILL = [sys.executable, "-m", "tokenmill"]
SERVE_ARGS = ["--max-model-len", "2048", "--kv-cache-memory", "512MiB", "--disable-log-requests",
              "--uvicorn-log-level", "warning"]


def _start(cmd: list[str], url: str, env: dict, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not start; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


GROUPS = (("engine replicas", "TokenmillEngine"), ("ingress", "TokenmillIngress"), ("Serve proxy", "ProxyActor"),
          ("bench client", "bench serve"), ("tokenmill serve", "tokenmill serve"),
          ("Ray system (GCS, raylet, controller, agents, ...)", ""))


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each group of this machine's processes (by command line)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "ray" not in cmd and "tokenmill" not in cmd and "gcs_server" not in cmd:
            continue
        group = next(name for name, needle in GROUPS if needle in cmd)
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def _bench(url: str, out: Path, name: str, concurrency: int, num_prompts: int, db: Path,
           input_len: int = 128, output_len: int = 64) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([*TOKENMILL, "bench", "serve", "--base-url", url, "--dataset-name", "random",
                    "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
                    "--max-concurrency", str(concurrency), "--num-prompts", str(num_prompts),
                    "--num-warmups", str(min(4, num_prompts)), "--seed", "0", "--disable-tqdm",
                    "--save-result", "--result-dir", str(out), "--result-filename", f"{name}.json",
                    "--db", str(db), "--label", name], check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the bench client, now exited
    result = json.loads((out / f"{name}.json").read_text())
    result["client_cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def _idle_cpu(args: argparse.Namespace, out: Path) -> int:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    model = ["--model", args.model] if args.model else []
    proc = _start([*TOKENMILL, "serve", "--ray", "--num-replicas", "1", *model, *SERVE_ARGS, "--port", str(port)],
                  f"http://127.0.0.1:{port}", env, out / "server-idle.log")
    try:
        time.sleep(10)  # past start-up
        cpu0 = _cpu_seconds()
        time.sleep(args.idle)
        cpu1 = _cpu_seconds()
    finally:
        _stop(proc)
    print(f"| process group (1 replica, idle) | CPU % of one core over {args.idle:.0f} s |\n|---|---:|")
    for group, _ in GROUPS:
        if group in cpu1:
            print(f"| {group} | {100 * (cpu1[group] - cpu0.get(group, 0.0)) / args.idle:.1f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Model to serve (default: tokenmill serve's default model).")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--latency-prompts", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                   help="Instead: CPU each process group uses with 1 replica and no load, over SECONDS.")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ray-serve-bench-"))
    if args.idle:
        return _idle_cpu(args, out)
    db = out / "history.db"
    model = ["--model", args.model] if args.model else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance of this machine's CPUs
    rows = []
    ray = [*TOKENMILL, "serve", "--ray", *model, *SERVE_ARGS]
    setups = [("tokenmill serve (1 thread)", [*TOKENMILL, "serve", *model, *SERVE_ARGS], {"OMP_NUM_THREADS": "1"}),
              ("Ray Serve, 1 replica", [*ray, "--num-replicas", "1"], {}),
              ("Ray Serve, 2 replicas", [*ray, "--num-replicas", "2"], {}),
              ("Ray Serve, 2 replicas, no stream batching", [*ray, "--num-replicas", "2",
                                                             "--stream-batching-interval-ms", "0"], {})]
    for i, (name, cmd, extra_env) in enumerate(setups):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"==> {name}: starting", file=sys.stderr)
        proc = _start([*cmd, "--port", str(port)], url, {**env, **extra_env}, out / f"server-{i}.log")
        try:
            print(f"==> {name}: latency at concurrency 1, then throughput at {args.concurrency}", file=sys.stderr)
            tiny = _bench(url, out, f"tiny-{i}", 1, 100, db, input_len=8, output_len=1)
            lat = _bench(url, out, f"lat-{i}", 1, args.latency_prompts, db)
            cpu0 = _cpu_seconds()
            thr = _bench(url, out, f"thr-{i}", args.concurrency, args.num_prompts, db)
            cpu1 = _cpu_seconds()
            # Processes that ended during the run (the bench client) count from 0.
            thr["cpu_s"] = {g: cpu1.get(g, 0.0) - cpu0.get(g, 0.0) for g in cpu1}
            thr["cpu_s"]["bench client"] = thr["client_cpu_s"]
        finally:
            _stop(proc)
        rows.append((name, lat, thr, tiny))
    print(f"\nModel: {args.model or 'the default model'}; random prompts, 128 tokens in, 64 out (ignore_eos); "
          f"results and logs in {out}\n")
    print("| setup | tiny request median / p90 ms | c=1 median TTFT ms | c=1 median ITL ms | c=1 median e2e ms "
          f"| c={args.concurrency} output tok/s | c={args.concurrency} req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, lat, thr, tiny in rows:
        print(f"| {name} | {tiny['median_e2el_ms']:.1f} / {tiny['p90_e2el_ms']:.1f} | {lat['median_ttft_ms']:.1f} "
              f"| {lat['median_itl_ms']:.2f} | {lat['median_e2el_ms']:.0f} "
              f"| {thr['output_throughput']:.1f} | {thr['request_throughput']:.2f} |")
    print(f"\nCPU seconds per 1,000 output tokens at c={args.concurrency}, by process group:\n")
    groups = [g for g, _ in GROUPS if any(g in thr["cpu_s"] for _, _, thr, _ in rows)]
    print("| setup | " + " | ".join(groups) + " |")
    print("|---|" + "---:|" * len(groups))
    for name, _, thr, _ in rows:
        per_k = 1000 / thr["total_output_tokens"]
        print(f"| {name} | " + " | ".join(f"{thr['cpu_s'].get(g, 0.0) * per_k:.2f}" for g in groups) + " |")
    direct, one, two = rows[0], rows[1], rows[2]
    print(f"\nThe Ray path adds to a tiny request: {one[3]['median_e2el_ms'] - direct[3]['median_e2el_ms']:+.1f} ms "
          f"(median); 2 replicas vs 1 at c={args.concurrency}: "
          f"{two[2]['output_throughput'] / one[2]['output_throughput']:.2f}x output tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
