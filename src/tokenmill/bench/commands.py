"""Handlers of the `tokenmill bench` subcommands: turn parsed flags into specs, call the
library, print, return an exit code (0 ok, 1 regression or nothing measured, 2 bad input,
130 interrupted by Ctrl-C after saving what was measured)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.markup import escape

from tokenmill.bench import display
from tokenmill.bench.compare import compare_runs, has_regression, parse_run_group
from tokenmill.bench.cost import cost_rows, load_prices
from tokenmill.bench.metrics import parse_slos
from tokenmill.bench.schema import LoadSpec, RunRecord
from tokenmill.bench.serve import ServeOutcome, ServeSpec, run_serve, vllm_style_result
from tokenmill.bench.store import RunFilter, Store, config_hash
from tokenmill.bench.workloads import WorkloadSpec

EXIT_INTERRUPTED = 130


def _handles_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, KeyError, FileNotFoundError, RuntimeError, httpx.HTTPError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # outside a measured run (setup); runs handle Ctrl-C themselves
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper


def serve_spec_from_args(args: argparse.Namespace) -> ServeSpec:
    """Build a ServeSpec from serve/sweep/capacity flags."""
    workload = WorkloadSpec(
        dataset_name=args.dataset_name, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio,
        random_prefix_len=args.random_prefix_len, prefix_num_prefixes=args.prefix_repetition_num_prefixes,
        prefix_prefix_len=args.prefix_repetition_prefix_len, prefix_suffix_len=args.prefix_repetition_suffix_len,
        prefix_output_len=args.prefix_repetition_output_len, dataset_path=args.dataset_path,
        file_output_len=args.file_output_len, grounded_input_len=args.grounded_input_len,
        grounded_output_len=args.grounded_output_len, grounded_path=args.grounded_path,
        chat_output_len=args.chat_output_len, prompt_format=args.prompt_format, seed=args.seed,
    )
    load = LoadSpec(request_rate=args.request_rate, burstiness=args.burstiness,
                    max_concurrency=args.max_concurrency, num_prompts=args.num_prompts,
                    duration_s=args.duration, num_warmups=args.num_warmups, seed=args.seed)
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    percentiles = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    return ServeSpec(
        base_url=args.base_url or f"http://{args.host}:{args.port}", model=args.model, endpoint=args.endpoint,
        workload=workload, load=load, tokenizer_path=args.tokenizer, ignore_eos=args.ignore_eos,
        openai_strict=args.openai_strict, extra_body=extra, temperature=args.temperature,
        request_timeout_s=args.request_timeout, percentiles=percentiles, slos_ms=parse_slos(args.goodput),
        label=args.label, hardware_sku=args.hardware_sku, instance_type=args.instance_type,
        show_progress=not args.disable_progress,
    )


def _print_cost(records: list[RunRecord], prices_path: str | None) -> None:
    try:
        prices = load_prices(prices_path)
    except (OSError, ValueError, RuntimeError) as exc:
        display.err_console.print(f"[dim]cost: price table unavailable ({exc})[/]")
        return
    rows, notes = cost_rows(records, prices)
    display.print_costs(rows, notes, prices.as_of)


def _finish_serve(outcome: ServeOutcome, args: argparse.Namespace) -> int:
    for note in outcome.record.workload.get("notes", []):
        display.err_console.print(f"[yellow]note:[/] {escape(note)}")
    display.print_summary(outcome.record, outcome.summary)
    errors = [s.error for s in outcome.record.samples if s.status == "error"]
    for err in list(dict.fromkeys(errors))[:5]:  # distinct messages, first few
        display.err_console.print(f"[red]error:[/] {escape(err)}")
    _print_cost([outcome.record], args.prices)
    if args.save_result:
        name = args.result_filename or f"tokenmill-bench-run{outcome.record.id}.json"
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(vllm_style_result(outcome.record), indent=1))
        display.err_console.print(f"result written to {path}")
    print(outcome.record.id)  # stdout: just the id, so scripts can capture it
    if outcome.record.interrupted:
        return EXIT_INTERRUPTED
    return 0 if outcome.summary.num_completed else 1


@_handles_errors
def cmd_serve(args: argparse.Namespace) -> int:
    spec = serve_spec_from_args(args)
    with Store(args.db) as store:
        outcome = run_serve(spec, store)
        display.err_console.print(f"saved run {outcome.record.id} to {store.path}")
    return _finish_serve(outcome, args)


def _csv(text: str | None, cast: type) -> tuple:
    return tuple(cast(x) for x in text.split(",") if x.strip()) if text else ()


@_handles_errors
def cmd_sweep(args: argparse.Namespace) -> int:
    from tokenmill.bench.sweep import SweepSpec, run_sweep

    spec = SweepSpec(serve_spec_from_args(args), request_rates=_csv(args.request_rates, float),
                     max_concurrencies=_csv(args.max_concurrencies, int), start=args.start_rate,
                     factor=args.rate_factor, max_steps=args.max_steps, min_gain=args.min_gain)

    def on_point(o: ServeOutcome) -> None:
        s = o.summary
        load = o.record.workload["load"]
        display.err_console.print(
            f"run {o.record.id}: rate={load['request_rate']} conc={load['max_concurrency']} -> "
            f"{s.request_throughput:.3g} req/s, {s.output_throughput:.4g} out tok/s, "
            f"TTFT p50 {s.ttft.median_ms:.4g} ms, TPOT p50 {s.tpot.median_ms:.4g} ms, failed {s.num_failed}")

    with Store(args.db) as store:
        outcomes = run_sweep(spec, store, on_point=on_point)
    for o in outcomes:
        print(o.record.id)
    if outcomes:
        display.err_console.print(f"series {outcomes[0].record.series}: {len(outcomes)} points")
    return EXIT_INTERRUPTED if outcomes and outcomes[-1].record.interrupted else 0


@_handles_errors
def cmd_capacity(args: argparse.Namespace) -> int:
    from tokenmill.bench.sweep import CapacitySpec, run_capacity

    serve = serve_spec_from_args(args)
    serve = dataclasses.replace(serve, slos_ms=parse_slos(args.slo))
    spec = CapacitySpec(serve, attainment=args.attainment, start_rate=args.start_rate, max_rate=args.max_rate,
                        tolerance=args.rate_tolerance, max_probes=args.max_probes)

    def on_probe(rate: float, o: ServeOutcome) -> None:
        ok = (o.summary.slo_attainment or 0.0) >= args.attainment
        display.err_console.print(f"run {o.record.id}: {rate:.4g} req/s -> attainment "
                                  f"{(o.summary.slo_attainment or 0) * 100:.1f}% {'PASS' if ok else 'fail'}")

    with Store(args.db) as store:
        result = run_capacity(spec, store, on_probe=on_probe)
    assert result.record is not None
    display.err_console.print(f"capacity: {result.capacity_rps:.4g} req/s at >= {args.attainment:.0%} SLO "
                              f"attainment (run {result.record.id})")
    _print_cost([result.record], args.prices)
    print(result.record.id)
    return EXIT_INTERRUPTED if result.record.interrupted else 0


@_handles_errors
def cmd_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.model_configs import cached_checkpoint
    from tokenmill.bench.throughput import ThroughputSpec, run_throughput, throughput_record

    if args.model_config:
        display.err_console.print(f"checkpoint for {args.model_config} (built on first use)...")
        model_dir, model_name = str(cached_checkpoint(args.model_config)), args.model_config
    else:
        model_dir, model_name = args.model, Path(args.model).name
    results = []
    with Store(args.db) as store:
        for backend in [b.strip() for b in args.backend.split(",") if b.strip()]:
            spec = ThroughputSpec(model_dir, backend, args.num_prompts, args.input_len, args.output_len,
                                  args.random_range_ratio, args.seed, args.dtype, args.max_num_seqs,
                                  args.max_num_batched_tokens, args.kv_cache_memory, args.max_model_len,
                                  args.device)
            display.err_console.print(f"running {backend} on {model_name}...")
            result = run_throughput(spec)
            record = throughput_record(spec, result, model_name, args.hardware_sku, args.instance_type, args.label)
            store.save(record)
            results.append(result)
            display.err_console.print(
                f"run {record.id} ({backend}): {result.elapsed_s:.2f} s, {result.requests_per_s:.3g} req/s, "
                f"{result.output_tokens_per_s:.4g} output tok/s, {result.total_tokens_per_s:.4g} total tok/s")
            _print_cost([record], args.prices)
            print(record.id)
    if len(results) == 2:
        a, b = results
        display.err_console.print(f"output tok/s ratio {a.backend}/{b.backend}: "
                                  f"{a.output_tokens_per_s / b.output_tokens_per_s:.3f}")
    return 0


@_handles_errors
def cmd_reference(args: argparse.Namespace) -> int:
    from tokenmill.bench.reference import ReferenceSpec, run_reference
    from tokenmill.bench.reference_md import command_line, render_markdown, write_marked

    spec = ReferenceSpec(models=_csv(args.models, str.strip), concurrencies=_csv(args.concurrency, int),
                         model_dir=args.model, input_len=args.input_len, output_len=args.output_len,
                         prefill_len=args.prefill_len, with_hf=args.hf, with_served=args.served,
                         with_prefill=args.prefill)
    with Store(args.db) as store:
        result = run_reference(spec, store)
        display.err_console.print(f"saved {len(result.run_ids)} runs to {store.path}")
    markdown = render_markdown(result, command_line(spec, args.output))
    if args.output:
        write_marked(Path(args.output), markdown)
        display.err_console.print(f"wrote {args.output}")
        for run_id in result.run_ids:
            print(run_id)
    else:
        print(markdown, end="")
    served = [r.served for r in result.decode_rows if r.served]
    return 1 if any(s.num_completed == 0 for s in served) else 0


@_handles_errors
def cmd_gpu(args: argparse.Namespace) -> int:
    from tokenmill.bench.gpu import (
        GpuBenchSpec,
        command_line,
        render_markdown,
        run_gpu_bench,
        write_result,
    )

    spec = GpuBenchSpec(models=_csv(args.models, str.strip), batches=_csv(args.batches, int),
                        input_len=args.input_len, output_len=args.output_len, device=args.device, with_hf=args.hf)
    result = run_gpu_bench(spec, log=lambda line: display.err_console.print(line))
    markdown = render_markdown(spec, result, command_line(spec, args.output))
    if args.output:
        write_result(Path(args.output), markdown)
        display.err_console.print(f"wrote {args.output}")
    else:
        print(markdown, end="")
    return 0


@_handles_errors
def cmd_spec(args: argparse.Namespace) -> int:
    from tokenmill.bench.spec import NGRAM_K4, SpecBenchSpec, run_spec_bench

    configs = [json.loads(c) for c in args.speculative_configs or [json.dumps(NGRAM_K4)]]
    if not all(isinstance(c, dict) for c in configs):
        raise ValueError("--speculative-config must be a JSON object")
    spec = SpecBenchSpec(
        model=args.model, quantization=args.quantization, dtype=args.dtype, speculative_configs=tuple(configs),
        workloads=_csv(args.workloads, str.strip), concurrencies=_csv(args.concurrency, int),
        num_prompts=args.num_prompts, repeats=args.repeats, temperature=args.temperature,
        ignore_eos=args.ignore_eos, grounded_input_len=args.grounded_input_len,
        grounded_output_len=args.grounded_output_len, grounded_path=args.grounded_path,
        chat_output_len=args.chat_output_len, seed=args.seed)
    result = run_spec_bench(spec)
    display.print_spec_bench(result)
    if args.json:
        print(result.to_json())
    return 0


@_handles_errors
def cmd_gateway(args: argparse.Namespace) -> int:
    import shlex
    import tempfile
    from contextlib import ExitStack
    from datetime import datetime, timezone

    from tokenmill.bench import gateway_bench as gb
    from tokenmill.bench.gateway_bench_md import command_line, memory_svg, render_markdown

    spec = gb.GatewayBenchSpec(
        rates=_csv(args.rates, float), duration_s=args.duration_s, warmup_s=args.warmup_s, passes=args.passes,
        memory_requests=args.memory_requests, memory_concurrency=args.memory_concurrency,
        memory_sample_every=args.memory_sample_every, memory_warmup_requests=args.memory_warmup_requests,
        request_timeout_s=args.request_timeout)
    if args.gateway_url and not args.backend_url:
        raise ValueError("--gateway-url needs --backend-url (the direct target)")
    if args.gateway_url and spec.memory_requests and args.gateway_pid is None:
        raise ValueError("memory mode against --gateway-url needs --gateway-pid")

    def progress(line: str) -> None:
        display.err_console.print(line, markup=False, highlight=False)

    started_at = datetime.now(timezone.utc)
    with ExitStack() as stack:
        if args.gateway_url:
            direct = gb.Target("direct", args.backend_url.rstrip("/"))
            key = args.api_key or gb.create_api_key(args.gateway_url.rstrip("/"), args.admin_key or gb.ADMIN_KEY)
            gateway = gb.Target("gateway", args.gateway_url.rstrip("/"), key, args.gateway_pid)
            extra = ["--gateway-url", args.gateway_url, "--backend-url", args.backend_url]
        else:
            progress("starting the fake backend and the gateway...")
            direct = stack.enter_context(gb.fake_server_process())
            tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenmill-gw-bench-")))
            gateway_args = shlex.split(args.gateway_args)
            gateway = stack.enter_context(gb.gateway_process(direct.base_url, tmp_dir, extra_args=gateway_args))
            progress(f"fake backend {direct.base_url}, gateway {gateway.base_url} (pid {gateway.pid})")
            extra = ["--gateway-args", args.gateway_args] if gateway_args else []
        result = gb.run_gateway_bench(spec, direct, gateway, progress)
    markdown = render_markdown(result, command_line(spec, extra), started_at)
    print(markdown, end="")
    if args.output:
        Path(args.output).write_text(markdown, encoding="utf-8")
        display.err_console.print(f"wrote {args.output}")
    if args.plot and result.memory:
        Path(args.plot).write_text(memory_svg(result.memory), encoding="utf-8")
        display.err_console.print(f"wrote {args.plot}")
    return 1 if result.num_errors else 0


def cmd_fake_server(args: argparse.Namespace) -> int:
    from tokenmill.bench import fake_server

    fake_server.exec_lean(["--port", str(args.port), "--host", args.host, "--model", args.model,
                           "--ttft-ms", str(args.ttft_ms), "--inter-token-ms", str(args.inter_token_ms)])
    return 0  # not reached: exec_lean replaces the process


def run_to_json(r: RunRecord) -> dict:
    """A run as the JSON object `history --json` prints."""
    return {"id": r.id, "time": r.created_at, "kind": r.kind, "hardware_sku": r.hardware_sku,
            "hardware": r.hardware, "software": r.software, "model": r.model, "label": r.label,
            "series": r.series, "instance_type": r.instance_type, "config_hash": config_hash(r.server),
            "server": r.server, "workload": r.workload, "summary": r.summary, "interrupted": r.interrupted}


def _filter(args: argparse.Namespace) -> RunFilter:
    return RunFilter(sku=args.sku, model=args.model, config=args.config, kind=getattr(args, "kind", None),
                     series=args.series, since=args.since, until=args.until, limit=args.limit or None)


@_handles_errors
def cmd_history(args: argparse.Namespace) -> int:
    with Store(args.db) as store:
        runs = store.list_runs(_filter(args))
    if args.json:
        print(json.dumps([run_to_json(r) for r in runs], indent=1))
    else:
        display.print_history(runs)
    return 0


def _load_group(store: Store, text: str) -> list[RunRecord]:
    return [store.get_run(i) for i in parse_run_group(text)]


@_handles_errors
def cmd_compare(args: argparse.Namespace) -> int:
    with Store(args.db) as store:
        base, new = _load_group(store, args.base), _load_group(store, args.new)
    comps = compare_runs(base, new, alpha=args.alpha, min_effect=args.min_effect)
    if args.json:
        print(json.dumps([c.__dict__ for c in comps], indent=1))
    else:
        display.print_comparison(comps)
    return 1 if has_regression(comps) else 0


@_handles_errors
def cmd_report(args: argparse.Namespace) -> int:
    from tokenmill.bench.report import build_report

    with Store(args.db) as store:
        if args.runs:
            runs = _load_group(store, args.runs)
        else:
            runs = [store.get_run(r.id) for r in store.list_runs(_filter(args)) if r.id is not None]
        comparison = None
        if args.compare:
            base, new = (_load_group(store, x) for x in args.compare)
            comparison = (base, new, compare_runs(base, new, args.alpha, args.min_effect))
        source = str(store.path)
    try:
        prices = load_prices(args.prices)
    except (OSError, ValueError, RuntimeError) as exc:
        display.err_console.print(f"[dim]cost section skipped: {exc}[/]")
        prices = None
    html = build_report(runs, prices, comparison, args.alpha, args.min_effect, args.title, source)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    display.err_console.print(f"wrote {out} ({len(runs)} runs)")
    return 0
