"""`tokenmill bench ...` argument parsers. Flag names follow `vllm bench serve` wherever the
concept is the same, so a vLLM user's command lines carry over. Handlers are in commands.py.

Standalone use (before/without the main CLI): `python -m tokenmill.bench.cli serve --help`.
"""

from __future__ import annotations

import argparse
import sys

from tokenmill.bench import commands, fake_server, faults_cli
from tokenmill.bench.gpu import BATCHES as GPU_BATCHES
from tokenmill.bench.gpu import MODELS as GPU_MODELS
from tokenmill.bench.model_configs import MODEL_CONFIGS
from tokenmill.bench.reference import DEFAULT_CONCURRENCIES as REFERENCE_MODELS
from tokenmill.bench.workloads import DATASET_NAMES

_DB_HELP = ("SQLite history file (default: $TOKENMILL_BENCH_DB, else "
            "$XDG_DATA_HOME/tokenmill/bench.db, i.e. ~/.local/share/tokenmill/bench.db).")


def _parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = text.strip().lower()
    num = s.rstrip("kmgib")
    if s[len(num):] not in units or not num:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; use e.g. 512MiB or 2GiB")
    return int(float(num) * units[s[len(num):]])


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="PATH", help=_DB_HELP)


def _add_context(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results and context")
    _add_db(g)
    g.add_argument("--label", default="", help="Free-text label stored with the run(s), e.g. 'main@abc123'.")
    g.add_argument("--hardware-sku", default=None, metavar="NAME",
                   help="Name to file runs under instead of the auto-detected SKU ('1x <GPU>' or "
                        "'<CPU model> x<cores>'). Use it when the server runs on another machine.")
    g.add_argument("--instance-type", default="", metavar="NAME",
                   help="Price-table key for cost figures (e.g. aws-g6.xlarge); GPU runs are matched by "
                        "GPU name when omitted, CPU runs need it.")
    g.add_argument("--prices", default=None, metavar="TOML",
                   help="Price table (default: ~/.config/tokenmill/prices.toml if present, else the "
                        "bundled list-price assumptions).")


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target server")
    g.add_argument("--base-url", default=None,
                   help="Server URL, with or without /v1 (default http://HOST:PORT). Works with any "
                        "OpenAI-compatible server: tokenmill, vLLM, SGLang, TGI, llama.cpp.")
    g.add_argument("--host", default="127.0.0.1", help="Server host when --base-url is not given.")
    g.add_argument("--port", type=int, default=8000, help="Server port when --base-url is not given (default %(default)s).")
    g.add_argument("--model", default=None, help="Model name to request (default: first id of GET /v1/models).")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="API: /v1/completions (prompt text) or /v1/chat/completions (one user message).")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="Folder with tokenizer.json (or the file) matching the served model; makes "
                        "random prompts and counts tokens when the server reports no usage "
                        "(default: the default model's tokenizer, else the demo model's).")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="Ask the server to generate exactly max_tokens (vLLM/tokenmill 'ignore_eos').")
    g.add_argument("--openai-strict", action="store_true",
                   help="Send only OpenAI API fields: drops ignore_eos and "
                        "stream_options.continuous_usage_stats, for servers that reject unknown fields.")
    g.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request body, e.g. '{\"top_k\": 1}'.")
    g.add_argument("--temperature", type=float, default=None,
                   help="Sampling temperature to send (default: not sent, the server's default).")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="Per-request timeout in seconds; a request that exceeds it counts as failed (default %(default)s).")


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", choices=DATASET_NAMES, default="random",
                   help="random: random token prompts; prefix (alias prefix_repetition): N shared "
                        "prefixes x random suffixes, exercises prefix caching; file (aliases sharegpt, "
                        "custom): prompts from --dataset-path; grounded: repeat/edit/reformat/summarise a "
                        "passage of tokenmill's own source or docstrings (+ --grounded-path), where "
                        "speculative decoding pays; chat: short open questions and writing tasks.")
    g.add_argument("--dataset-path", default=None,
                   help="For 'file': JSONL of {\"prompt\": str} or {\"messages\": [...]} (optional "
                        "\"output_len\"), or ShareGPT JSON/JSONL ({\"conversations\": [...]}).")
    g.add_argument("--random-input-len", type=int, default=256, help="Mean prompt length in tokens (random) (default %(default)s).")
    g.add_argument("--random-output-len", type=int, default=64, help="Mean output length in tokens (random) (default %(default)s).")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="Lengths are uniform in [len*(1-r), len*(1+r)]; 0 gives fixed lengths (default %(default)s).")
    g.add_argument("--random-prefix-len", type=int, default=0,
                   help="Tokens of one fixed prefix put before every random prompt (default %(default)s).")
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=4, help="Distinct shared prefixes (prefix) (default %(default)s).")
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=192, help="Prefix length in tokens (prefix) (default %(default)s).")
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=64, help="Random suffix length (prefix) (default %(default)s).")
    g.add_argument("--prefix-repetition-output-len", type=int, default=64, help="Output length (prefix) (default %(default)s).")
    g.add_argument("--sharegpt-output-len", "--custom-output-len", dest="file_output_len", type=int, default=None,
                   help="Output length for every file prompt (default: the file's, or its reply's length).")
    _add_grounded(g)
    g.add_argument("--prompt-format", choices=("text", "token-ids"), default="text",
                   help="Send prompts as text (default, as vLLM) or as token-id lists (completions only).")


def _add_grounded(g: argparse._ArgumentGroup) -> None:
    """The grounded and chat workloads' flags (shared by serve/sweep/capacity and spec)."""
    g.add_argument("--grounded-input-len", type=int, default=256,
                   help="Prompt tokens (instruction + passage) at most, grounded; passages end on whole "
                        "lines (default %(default)s).")
    g.add_argument("--grounded-output-len", type=int, default=128, help="max_tokens, grounded (default %(default)s).")
    g.add_argument("--grounded-path", default=None, metavar="FILE",
                   help="A plain-text file whose paragraphs join the built-in passages (grounded).")
    g.add_argument("--chat-output-len", type=int, default=128, help="max_tokens, chat (default %(default)s).")


def _add_load(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load (always bounded: stops by itself)")
    g.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Open-loop arrivals per second; inf (default) sends all at once, i.e. closed "
                        "loop when --max-concurrency is set.")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more regular (default %(default)s).")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="Cap on requests in flight; with --request-rate inf this is a closed loop.")
    g.add_argument("--num-prompts", type=int, default=100, help="Measured requests to send (default %(default)s).")
    g.add_argument("--duration", type=float, default=None, metavar="S",
                   help="Stop sending after S seconds (in-flight requests finish); with --num-prompts, "
                        "whichever comes first.")
    g.add_argument("--num-warmups", type=int, default=1, help="Unmeasured requests sent first (default %(default)s).")
    g.add_argument("--seed", type=int, default=0, help="Seed of prompts and arrival times (default %(default)s).")


def _add_metrics(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics and output")
    g.add_argument("--metric-percentiles", default="50,90,99",
                   help="Comma-separated percentiles to report (default 50,90,99).")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="Accepted for vLLM compatibility; all four metrics are always computed and stored.")
    g.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, vLLM style ('ttft:500 tpot:50', or ttft=500,tpot=50); "
                        "metrics ttft, tpot, e2el in ms.")
    g.add_argument("--save-result", action="store_true",
                   help="Also write a JSON result file with vLLM's key names.")
    g.add_argument("--result-dir", default=".", help="Folder for --save-result (default: current).")
    g.add_argument("--result-filename", default=None, help="File name for --save-result.")
    g.add_argument("--disable-tqdm", "--no-progress", dest="disable_progress", action="store_true",
                   help="No progress bar.")


def _add_run_filters(p: argparse.ArgumentParser, with_kind: bool, limit: int, limit_help: str) -> None:
    """The history filters (RunFilter), shared by `history` and `report`."""
    p.add_argument("--sku", default=None, help="Hardware SKU substring.")
    p.add_argument("--model", default=None, help="Model name substring.")
    p.add_argument("--config", default=None, help="Server config hash prefix, or substring of config/label.")
    if with_kind:
        p.add_argument("--kind", choices=("serve", "throughput", "capacity"), default=None, help="Run kind.")
    p.add_argument("--series", default=None, help="Sweep/capacity series id substring.")
    p.add_argument("--since", default=None, metavar="DATE", help="Runs at or after this ISO date/time (UTC).")
    p.add_argument("--until", default=None, metavar="DATE", help="Runs before this ISO date/time (UTC).")
    p.add_argument("--limit", type=int, default=limit, help=limit_help + " (default %(default)s).")


def add_bench_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register serve, sweep, capacity, throughput, reference, gpu, spec, gateway, faults, fake-server,
    history, compare and report.

    Args:
        sub: the subparsers object of the `bench` parser; each command sets `func`, which
            takes the parsed args and returns an exit code.
    """
    p = sub.add_parser("serve", help="Measure one run against an OpenAI-compatible server; prints the run id.",
                       description="Load-test a server and store the run (per-request samples included) in "
                                   "the history database. Progress and results go to stderr; stdout gets "
                                   "the new run id. Ctrl-C stops and keeps what was measured.")
    for add in (_add_target, _add_workload, _add_load, _add_metrics, _add_context):
        add(p)
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser("sweep", help="Runs at increasing request rates (or concurrencies) up to saturation.",
                       description="Each load point is a stored serve run sharing one series id.")
    g = p.add_argument_group("sweep points")
    g.add_argument("--request-rates", default=None, metavar="R1,R2,...", help="Explicit request rates.")
    g.add_argument("--max-concurrencies", default=None, metavar="C1,C2,...",
                   help="Explicit closed-loop concurrencies (instead of rates).")
    g.add_argument("--start-rate", type=float, default=1.0, help="Auto mode: first request rate (default %(default)s).")
    g.add_argument("--rate-factor", type=float, default=2.0, help="Auto mode: next rate = previous x factor (default %(default)s).")
    g.add_argument("--max-steps", type=int, default=8, help="Auto mode: at most this many points (default %(default)s).")
    g.add_argument("--min-gain", type=float, default=0.05,
                   help="Auto mode: saturated when output tok/s grows less than this fraction (default %(default)s).")
    for add in (_add_target, _add_workload, _add_load, _add_metrics, _add_context):
        add(p)
    p.set_defaults(func=commands.cmd_sweep)

    p = sub.add_parser("capacity", help="Highest request rate meeting SLOs for a fraction of requests.",
                       description="Goodput capacity (DistServe): the highest request rate at which at "
                                   "least --attainment of requests meet every SLO, by doubling then bisection.")
    g = p.add_argument_group("search")
    g.add_argument("--slo", required=True, metavar="ttft=MS,tpot=MS",
                   help="SLOs in ms (ttft, tpot, e2el); a value may end in 's' for seconds.")
    g.add_argument("--attainment", type=float, default=0.9, help="Required fraction of requests meeting all SLOs (default %(default)s).")
    g.add_argument("--start-rate", type=float, default=1.0, help="First probed request rate (default %(default)s).")
    g.add_argument("--max-rate", type=float, default=1024.0, help="Highest request rate probed (default %(default)s).")
    g.add_argument("--rate-tolerance", type=float, default=0.1, help="Stop when the bracket is this tight (relative) (default %(default)s).")
    g.add_argument("--max-probes", type=int, default=12, help="At most this many probe runs (default %(default)s).")
    for add in (_add_target, _add_workload, _add_load, _add_metrics, _add_context):
        add(p)
    p.set_defaults(func=commands.cmd_capacity)

    p = sub.add_parser("throughput",
                       help="Offline engine throughput (tokenmill LLM or HF transformers) on a fixed workload.")
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--model", default=None, metavar="PATH", help="HF checkpoint folder or GGUF file.")
    m.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                   help="Random-weight checkpoint with a real model's architecture (built once, cached "
                        "under $XDG_CACHE_HOME/tokenmill/checkpoints).")
    p.add_argument("--backend", default="tokenmill",
                   help="tokenmill, hf, or both as 'tokenmill,hf' (same workload, ratio printed; default tokenmill).")
    p.add_argument("--num-prompts", type=int, default=64, help="Sequences in the workload (default %(default)s).")
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128,
                   help="Prompt tokens per sequence (default %(default)s).")
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=128,
                   help="Generated tokens per sequence (ignore_eos) (default %(default)s).")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="Length spread, as in serve (default %(default)s).")
    p.add_argument("--seed", type=int, default=0, help="Workload seed (default %(default)s).")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="Weights/activations dtype (default auto: the checkpoint's).")
    p.add_argument("--max-num-seqs", "--batch-size", dest="max_num_seqs", type=int, default=32,
                   help="tokenmill: running-batch cap; hf: static batch size (default %(default)s).")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokenmill: token budget of one engine step (default: the engine's).")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokenmill: context length to configure (default: the workload's longest sequence).")
    p.add_argument("--kv-cache-memory", type=_parse_bytes, default=None, metavar="BYTES",
                   help="tokenmill: KV cache budget, e.g. 2GiB or 512MiB (default: the engine's).")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for both backends (default %(default)s).")
    _add_context(p)
    p.set_defaults(func=commands.cmd_throughput)

    p = sub.add_parser("reference",
                       help="Reproduce the performance reference table (tokenmill vs HF, offline and served).",
                       description="Measure tokenmill offline, HF transformers generate and tokenmill served side "
                                   "by side on random-weight checkpoints with real models' configs (in the dtype "
                                   "`--dtype auto` picks; greedy, ignore_eos) and write the tables as Markdown. Progress goes to "
                                   "stderr; every measurement is also stored in the history (label "
                                   "'reference'). The full default run takes a long time on a CPU (HF at "
                                   "concurrency 64 on the 1B model alone can take many minutes).")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="Markdown file to update: only the text between <!-- reference:begin --> and "
                        "<!-- reference:end --> is replaced (the block is appended when the markers are "
                        "absent); stdout then gets the run ids. Default: print the Markdown on stdout.")
    p.add_argument("--models", default=",".join(REFERENCE_MODELS), metavar="M1,M2",
                   help=f"Model configs to measure, comma-separated (default {','.join(REFERENCE_MODELS)}); "
                        "served and prefill rows are measured for smollm2-135m only.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="Measure this HF checkpoint instead of the model configs (with served and prefill rows).")
    p.add_argument("--concurrency", default=None, metavar="C1,C2",
                   help="Concurrencies for every model (default 1,16,64 for smollm2-135m and --model, "
                        "1,64 for the others).")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="Skip the HF transformers baseline.")
    p.add_argument("--no-served", dest="served", action="store_false",
                   help="Skip the served rows (no `tokenmill serve` subprocess).")
    p.add_argument("--no-prefill", dest="prefill", action="store_false", help="Skip the prefill rows.")
    p.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request (default %(default)s).")
    p.add_argument("--output-len", type=int, default=128,
                   help="Generated tokens per request (ignore_eos) (default %(default)s).")
    p.add_argument("--prefill-len", type=int, default=1024,
                   help="Prompt tokens of the prefill rows (default %(default)s).")
    _add_db(p)
    p.set_defaults(func=commands.cmd_reference)

    p = sub.add_parser("gpu", help="GPU decode throughput vs transformers, the bandwidth roofline, a step's profile.",
                       description="On a GPU: decode output tok/s at each batch size for tokenmill and transformers "
                                   "generate side by side (random-weight checkpoints with real models' configs and "
                                   "the real default model; bf16, greedy, ignore_eos), batch-1 decode as a fraction "
                                   "of the memory-bandwidth roofline, and a torch profiler breakdown of one decode "
                                   "step. Progress goes to stderr. See docs/performance.md (GPU).")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="Markdown file to update between <!-- gpu:begin --> and <!-- gpu:end --> (appended when "
                        "absent). Default: print the Markdown on stdout.")
    p.add_argument("--models", default=",".join(GPU_MODELS), metavar="M1,M2",
                   help=f"Model configs, 'default' (the real default model) or checkpoint paths "
                        f"(default {','.join(GPU_MODELS)}).")
    p.add_argument("--batches", default=",".join(map(str, GPU_BATCHES)), metavar="B1,B2",
                   help="Batch sizes (requests at once) (default %(default)s).")
    p.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request (default %(default)s).")
    p.add_argument("--output-len", type=int, default=128,
                   help="Generated tokens per request (ignore_eos) (default %(default)s).")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="Skip the transformers baseline.")
    p.add_argument("--device", default="cuda", help="Device (default %(default)s; cpu runs it small, for tests).")
    p.set_defaults(func=commands.cmd_gpu)

    p = sub.add_parser("spec", help="Speculative decoding off vs on, offline, side by side (tok/s, acceptance).",
                       description="Measure tokenmill's offline engine with speculation off and with each "
                                   "--speculative-config, side by side in one run, on the grounded and chat "
                                   "workloads at each concurrency: output tok/s, ratio vs off, mean acceptance "
                                   "length (1 + accepted/drafts) and acceptance rate (accepted/draft tokens). "
                                   "One engine per config, built once and warmed up; repeats are interleaved. "
                                   "Progress and the table go to stderr; --json prints the cells on stdout.")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="Target checkpoint folder or GGUF file (default: the default model, SmolLM2-135M-Instruct).")
    p.add_argument("--quantization", choices=("auto", "none"), default="auto",
                   help="How the target's quantized weights run (as `tokenmill serve`; default %(default)s).")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="Weights/activations dtype (default auto).")
    p.add_argument("--speculative-config", action="append", default=None, metavar="JSON", dest="speculative_configs",
                   help="A speculative config to measure against off, as `tokenmill serve --speculative-config`; "
                        "repeat the flag for several (default: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}').")
    p.add_argument("--workloads", default="grounded,chat", metavar="W1,W2",
                   help="grounded and/or chat (default %(default)s).")
    p.add_argument("--concurrency", default="1,64", metavar="C1,C2",
                   help="Requests in flight (closed loop; the engines' max_num_seqs is the largest) (default %(default)s).")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="Requests per cell (default: max(6, concurrency)).")
    p.add_argument("--repeats", type=int, default=1,
                   help="Measure every cell this many times, interleaved across configs; the median is "
                        "reported (default %(default)s).")
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 = greedy (default %(default)s).")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=False,
                   help="Generate exactly max_tokens (default: stop at EOS; past its natural end a small "
                        "model tends to loop, which flatters ngram).")
    p.add_argument("--seed", type=int, default=0, help="Workload and sampling seed (default %(default)s).")
    _add_grounded(p.add_argument_group("workloads"))
    p.add_argument("--json", action="store_true", help="Print the cells as JSON on stdout.")
    p.set_defaults(func=commands.cmd_spec)

    p = sub.add_parser("gateway", help="Latency and memory the gateway adds, against the fake backend, side by side.",
                       description="Start the fake OpenAI backend (`bench fake-server`) and `tokenmill gateway "
                                   "serve` in front of it (free loopback ports, one API key made through the "
                                   "admin API), then send the same open-loop load (constant rate, non-streaming "
                                   "/v1/completions, aiohttp) to both, alternating targets in every pass: "
                                   "p50/p99 direct and through the gateway, the difference (added latency), "
                                   "achieved rate, errors; the gateway's own added-latency histogram when its "
                                   "/metrics has one. --memory-requests N then sends N requests through the "
                                   "gateway and follows its RSS. A Markdown report goes to stdout, progress to "
                                   "stderr; exit code 1 if any request failed.")
    g = p.add_argument_group("latency")
    g.add_argument("--rates", default="100,500", metavar="R1,R2", help="Request rates, req/s (default %(default)s).")
    g.add_argument("--duration-s", type=float, default=20.0, metavar="S",
                   help="Measured seconds per target, rate and pass (default %(default)s).")
    g.add_argument("--warmup-s", type=float, default=1.0, metavar="S",
                   help="Unrecorded seconds at the same rate before each measured stretch (default %(default)s).")
    g.add_argument("--passes", type=int, default=2,
                   help="Passes over rates x targets; the target order alternates, results are pooled (default %(default)s).")
    g.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="Per-request timeout; a timeout counts as an error (default %(default)s).")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-requests", type=int, default=0, metavar="N",
                   help="After the latency passes, send N requests through the gateway (closed loop) and sample "
                        "its RSS, e.g. 200000 (default 0: off).")
    g.add_argument("--memory-concurrency", type=int, default=32, help="Requests in flight in memory mode (default %(default)s).")
    g.add_argument("--memory-sample-every", type=int, default=5000, metavar="N",
                   help="Requests between RSS samples (default %(default)s).")
    g.add_argument("--memory-warmup-requests", type=int, default=20000, metavar="N",
                   help="RSS slope is fitted after this many requests (default %(default)s).")
    g.add_argument("--plot", default=None, metavar="SVG", help="Write the RSS series as an SVG chart (memory mode).")
    g = p.add_argument_group("servers")
    g.add_argument("--gateway-args", default="", metavar="'ARGS'",
                   help="Further `tokenmill gateway serve` flags for the gateway it starts, in one quoted "
                        "string, e.g. '--access-log off'.")
    g = p.add_argument_group("servers already running (default: start the fake backend and the gateway)")
    g.add_argument("--gateway-url", default=None, help="Measure this gateway instead of starting one.")
    g.add_argument("--backend-url", default=None, help="The backend behind --gateway-url (the direct target).")
    g.add_argument("--api-key", default=None, help="Key for --gateway-url (default: make one with --admin-key).")
    g.add_argument("--admin-key", default=None, help="Admin key of --gateway-url, to make the API key.")
    g.add_argument("--gateway-pid", type=int, default=None, help="Process id of --gateway-url (memory mode needs it).")
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="Also write the Markdown report to FILE.")
    p.set_defaults(func=commands.cmd_gateway)

    p = sub.add_parser("faults", help="Inject known faults into a live tokenmill; time `tokenmill watch`'s reports.",
                       description="Per fault: start tokenmill serve (two behind tokenmill gateway for "
                                   "backend_killed), a steady Poisson load (the bench load generator), a metrics "
                                   "recorder and tokenmill watch; inject the fault after --warmup-s, remove it after "
                                   "--fault-s, keep going for --after-s. Reports per fault the seconds from injection "
                                   "to the watcher's first incident, the cause it named, false alarms, the signals "
                                   "that moved and what the clients saw. A Markdown report goes to stdout, progress to "
                                   "stderr; exit code 1 if the watcher missed a fault, named a wrong cause or raised a "
                                   "false alarm.")
    faults_cli.add_arguments(p)
    p.set_defaults(func=faults_cli.cmd_faults)

    p = sub.add_parser("fake-server", help="Run the fast fake OpenAI-compatible server (overhead measurements).",
                       description="A raw ASGI app on uvicorn (uvloop, httptools): /health, /v1/models, /metrics, "
                                   "/v1/completions and /v1/chat/completions, streaming or not. Completion "
                                   "tokens = max_tokens (default 16) copies of ' ok'; prompt_tokens = "
                                   "whitespace-separated words of the prompt (or of all message contents). "
                                   "Also: python -m tokenmill.bench.fake_server.")
    fake_server.add_arguments(p)
    p.set_defaults(func=commands.cmd_fake_server)

    p = sub.add_parser("history", help="List stored runs, filtered.")
    _add_db(p)
    p.add_argument("--json", action="store_true", help="Print a JSON array of run objects on stdout.")
    _add_run_filters(p, with_kind=True, limit=50, limit_help="At most this many runs (0: all)")
    p.set_defaults(func=commands.cmd_history)

    p = sub.add_parser("compare",
                       help="A/B verdicts between runs; exit code 1 on a regression (for CI).",
                       description="BASE and NEW are run ids, comma lists or ranges of repeated runs "
                                   "(e.g. 3,4,5 or 3-5). Latency: Mann-Whitney U on per-request samples; "
                                   "throughput: Welch's t over runs (2+ per side). A verdict needs "
                                   "p < --alpha AND a change of at least --min-effect.")
    p.add_argument("base", metavar="BASE", help="Baseline run id(s).")
    p.add_argument("new", metavar="NEW", help="Candidate run id(s).")
    _add_db(p)
    p.add_argument("--alpha", type=float, default=0.05, help="Significance level (two-sided) (default %(default)s).")
    p.add_argument("--min-effect", type=float, default=0.05, help="Minimum relative change that counts (default %(default)s).")
    p.add_argument("--json", action="store_true", help="Print the comparison as JSON on stdout.")
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser("report", help="Write one self-contained HTML report.")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="HTML file to write.")
    _add_db(p)
    p.add_argument("--runs", default=None, metavar="IDS", help="Run ids (comma list/ranges); default: filters.")
    _add_run_filters(p, with_kind=False, limit=20, limit_help="At most this many runs from the filters")
    p.add_argument("--compare", nargs=2, default=None, metavar=("BASE", "NEW"),
                   help="Add an A/B section for these run ids/groups.")
    p.add_argument("--alpha", type=float, default=0.05, help="Significance level for --compare (default %(default)s).")
    p.add_argument("--min-effect", type=float, default=0.05, help="Minimum relative change for --compare (default %(default)s).")
    p.add_argument("--prices", default=None, metavar="TOML", help="Price table for the cost section.")
    p.add_argument("--title", default="tokenmill bench report", help="Page title.")
    p.set_defaults(func=commands.cmd_report)


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenmill.bench.cli ...`: the bench commands without the main CLI."""
    parser = argparse.ArgumentParser(prog="tokenmill bench", description="tokenmill bench lab")
    add_bench_subcommands(parser.add_subparsers(dest="bench_cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
