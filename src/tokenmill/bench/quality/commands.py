"""Handlers of `tokenmill eval ...`: flags -> library -> printed results -> exit code (0 ok,
1 regression, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from tokenmill.bench.commands import _handles_errors, run_to_json
from tokenmill.bench.quality.protocol import Protocol
from tokenmill.bench.quality.run import EvalSpec, finish_logits, run_eval
from tokenmill.bench.quality.server import ServerTarget
from tokenmill.bench.quality.verdict import IMPROVEMENT, REGRESSION, compare_quality, has_regression
from tokenmill.bench.schema import RunRecord
from tokenmill.bench.store import RunFilter, Store, config_hash

_CHECK_NAMES = {"ppl_ratio": "PPL(new)/PPL(base)", "mean_kld": "mean KLD (nats)", "same_top": "same top token"}


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    from tokenmill.cli import engine_kwargs

    backend = args.backend or ("server" if args.base_url else "tokenmill")
    server = None
    if backend == "server":
        if not args.base_url:
            raise ValueError("--backend server needs --base-url")
        extra = json.loads(args.extra_body) if args.extra_body else {}
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        server = ServerTarget(args.base_url, args.served_model, args.logprobs, args.max_concurrency,
                              args.request_timeout, extra)
    return EvalSpec(text_path=args.text, protocol=Protocol(args.ctx_size, args.chunks), backend=backend,
                    model=args.model, engine_args=engine_kwargs(args), server=server, tokenizer=args.tokenizer,
                    save_logits=args.save_logits, reference=args.reference, label=args.label,
                    hardware_sku=args.hardware_sku, show_progress=args.progress)


def describe_run(record: RunRecord) -> str:
    """'demo_model tokenmill float32' and the like."""
    config = (record.server or {}).get("config") or (record.server or {}).get("client_config") or {}
    parts = [record.model, str(config.get("backend", (record.server or {}).get("name", "")))]
    if config.get("dtype"):
        parts.append(str(config["dtype"]))
    if config.get("quantization") == "none":  # a quantized file dequantized at load, not run as stored
        parts.append("quantization=none")
    return " ".join(parts)


def _small(v: float) -> str:
    """llama-perplexity prints 6 decimals; values below 1e-3 get 4 significant digits, so a
    divergence of 1e-6 between two float32 implementations does not read as 0."""
    return f"{v:.6f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.4e}"


def format_result(record: RunRecord) -> str:
    """The result block, in llama-perplexity's terms."""
    s, proto = record.summary, record.workload["protocol"]
    ppl = s["perplexity"]
    bos = f"BOS (id {proto['bos_token_id']}) first" if proto["bos_token_id"] is not None else "no BOS"
    lines = [
        f"model: {describe_run(record)}   hardware: {record.hardware_sku}",
        f"text: {record.workload['text']} ({proto['num_text_tokens']:,} tokens): {proto['num_chunks']} windows "
        f"of {proto['ctx_size']} ({bos}), positions {proto['first_scored_position']}.."
        f"{proto['ctx_size'] - 2} scored: {ppl['num_tokens']:,} tokens in {s['elapsed_s']:.1f} s",
        f"Final estimate: PPL = {ppl['ppl']:.4f} +/- {ppl['ppl_se']:.5f}",
    ]
    d = s.get("divergence")
    if d:
        ref = s.get("reference") or {}
        lines += [
            f"====== against reference {ref.get('model')} {(ref.get('config') or {}).get('backend', '')} "
            f"{(ref.get('config') or {}).get('dtype', '')} (run {ref.get('run_id')}) ======",
            f"Mean PPL(base)                : {d['ref_ppl']:.6f}",
            f"Mean PPL(Q)/PPL(base)         : {d['ppl_ratio']:.6f}",
            f"Mean ln(PPL(Q)/PPL(base))     : {_small(d['ln_ppl_ratio'])} +/- {_small(d['ln_ppl_ratio_se'])}",
            f"Mean    KLD: {_small(d['mean_kld'])} +/- {_small(d['kld_se'])}",
            *(f"{name:<7} KLD: {_small(v)}" for name, v in d["kld_percentiles"].items()),
            f"Same top p: {100 * d['same_top']:.3f} +/- {100 * d['same_top_se']:.3f} % "
            f"({d['num_top_judged']:,} positions judged)",
        ]
    return "\n".join(lines)


@_handles_errors
def cmd_perplexity(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    outcome = run_eval(spec)
    with Store(args.db) as store:
        run_id = store.save(outcome.record)
    finish_logits(outcome)
    if args.json:
        print(json.dumps(run_to_json(outcome.record), indent=1))
    else:
        print(format_result(outcome.record))
    print(f"stored as quality run {run_id} in {store.path}"
          + (f"; logits saved to {spec.save_logits}" if spec.save_logits else ""), file=sys.stderr)
    return 0


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.3f}%" if metric == "same_top" else f"{v:.6f}" if metric == "ppl_ratio" else f"{v:.3g}"


@_handles_errors
def cmd_compare(args: argparse.Namespace) -> int:
    with Store(args.db) as store:
        base, new = store.get_run(args.base, with_samples=False), store.get_run(args.new, with_samples=False)
    checks = compare_quality(base, new, args.max_ppl_increase, args.max_kld, args.min_same_top,
                             args.confidence, args.resamples)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=1))
        return 1 if has_regression(checks) else 0
    pct = round(100 * args.confidence)
    t = Table(title=f"eval compare: run {new.id} ({describe_run(new)}) vs base run {base.id} ({describe_run(base)})")
    for col in ("check", "value", f"{pct}% CI", "limit", "verdict"):
        t.add_column(col, justify="left" if col in ("check", "verdict") else "right")
    for c in checks:
        style = "bold red" if c.verdict == REGRESSION else "bold green" if c.verdict == IMPROVEMENT else ""
        limit = "-" if c.threshold is None else ("<= " if c.metric != "same_top" else ">= ") + _fmt(c.metric, c.threshold)
        t.add_row(_CHECK_NAMES[c.metric], _fmt(c.metric, c.value),
                  f"[{_fmt(c.metric, c.ci_low)}, {_fmt(c.metric, c.ci_high)}]", limit,
                  f"[{style}]{c.verdict}[/]" if style else c.verdict)
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    b, n = base.summary["perplexity"], new.summary["perplexity"]
    print(f"PPL base {b['ppl']:.4f} +/- {b['ppl_se']:.4f}, new {n['ppl']:.4f} +/- {n['ppl_se']:.4f} "
          f"({len(base.summary['chunk_mean_nll'])} windows, bootstrap over windows)")
    return 1 if has_regression(checks) else 0


def history_row(r: RunRecord) -> list[Any]:
    s, proto = r.summary, r.workload.get("protocol", {})
    ppl, d = s.get("perplexity", {}), s.get("divergence")
    ref = (s.get("reference") or {}).get("run_id")
    return [str(r.id), r.created_at[:16].replace("T", " "), r.model, describe_run(r).split(" ", 1)[-1],
            r.hardware_sku, f"{r.workload.get('text')} {proto.get('ctx_size')}x{proto.get('num_chunks')}",
            f"{ppl.get('ppl', float('nan')):.4f} +/- {ppl.get('ppl_se', float('nan')):.4f}",
            f"{d['mean_kld']:.3g} (run {ref})" if d else "-", f"{100 * d['same_top']:.2f}%" if d else "-",
            config_hash(r.server) or "-", r.label]


@_handles_errors
def cmd_history(args: argparse.Namespace) -> int:
    with Store(args.db) as store:
        runs = store.list_runs(RunFilter(kind="quality", model=args.model, sku=args.sku, limit=args.limit or None))
    if args.json:
        print(json.dumps([run_to_json(r) for r in runs], indent=1))
        return 0
    t = Table(title="eval history (newest first)")
    for col in ("id", "time (UTC)", "model", "backend", "hardware", "text ctx x windows", "PPL", "KLD",
                "same top", "config", "label"):
        t.add_column(col, overflow="fold")
    for r in runs:
        t.add_row(*history_row(r))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    return 0
