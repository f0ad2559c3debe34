"""Terminal output of the bench commands (rich tables on stderr; stdout is for ids and JSON)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokenmill.bench.compare import IMPROVEMENT, REGRESSION, MetricComparison
from tokenmill.bench.cost import CostRow
from tokenmill.bench.schema import RunRecord, RunSummary
from tokenmill.bench.spec import SpecBenchResult
from tokenmill.bench.store import config_hash

err_console = Console(stderr=True)
_NAMES = {"ttft": "Time to first token (TTFT)", "tpot": "Time per output token (TPOT, excl. 1st)",
          "itl": "Inter-token latency (ITL)", "e2el": "End-to-end latency (E2EL)"}


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_summary(record: RunRecord, summary: RunSummary, console: Console = err_console) -> None:
    """The vLLM-style result block of one serve run."""
    t = Table(title=f"Serving benchmark: {escape(record.model)}", show_header=False, box=None)
    t.add_column(justify="left")
    t.add_column(justify="right")
    load = record.workload.get("load", {})
    rows = [
        ("Request rate / burstiness / max concurrency",
         f"{load.get('request_rate')} / {load.get('burstiness')} / {load.get('max_concurrency') or '-'}"),
        ("Successful requests", f"{summary.num_completed}"),
        ("Failed requests", f"{summary.num_failed}"),
        ("Incomplete requests", f"{summary.num_incomplete}"),
        ("Benchmark duration (s)", _f(summary.duration_s)),
        ("Total input tokens", f"{summary.total_input_tokens}"),
        ("Total generated tokens", f"{summary.total_output_tokens}"),
        ("Request throughput (req/s)", _f(summary.request_throughput)),
        ("Output token throughput (tok/s)", _f(summary.output_throughput)),
        ("Total token throughput (tok/s)", _f(summary.total_token_throughput)),
    ]
    if summary.slos_ms:
        slos = ", ".join(f"{k}<={v:g}ms" for k, v in summary.slos_ms.items())
        rows += [(f"Goodput (req/s) [{slos}]", _f(summary.goodput)),
                 ("SLO attainment", _f((summary.slo_attainment or 0) * 100, 1) + " %")]
    for name, value in rows:
        t.add_row(name, value)
    for key, title in _NAMES.items():
        st = getattr(summary, key)
        t.add_row(f"[bold]{title}[/]", f"n={st.count}")
        t.add_row("  mean / median / std (ms)", f"{_f(st.mean_ms)} / {_f(st.median_ms)} / {_f(st.std_ms)}")
        t.add_row("  " + " / ".join(st.percentiles_ms) + " (ms)", " / ".join(_f(v) for v in st.percentiles_ms.values()))
    for name, value in spec_decode_rows(record.summary.get("spec_decode")):  # last, as vLLM prints it
        t.add_row(name, value)
    console.print(t)
    if record.interrupted:
        console.print("[yellow]Interrupted: the results above cover what was measured before Ctrl-C.[/]")


def _pct_str(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}"


def spec_decode_rows(spec: dict | None) -> list[tuple[str, str]]:
    """The speculative decoding block of a serve run (vLLM's rows); empty when the server
    exposed no counters."""
    if not spec:
        return []
    per_pos = " / ".join(_pct_str(v) for v in spec["per_position_acceptance_rate"]) or "-"
    return [("[bold]Speculative decoding[/]", ""),
            ("  Mean acceptance length", _f(spec["mean_acceptance_length"])),
            ("  Acceptance rate (%)", _pct_str(spec["acceptance_rate"])),
            ("  Drafts / draft tokens / accepted tokens",
             f"{spec['num_drafts']} / {spec['num_draft_tokens']} / {spec['num_accepted_tokens']}"),
            ("  Per-position acceptance rate (%)", per_pos)]


def print_spec_bench(result: SpecBenchResult, console: Console | None = None) -> None:
    """`bench spec`: one row per workload x concurrency x config."""
    t = Table(title=f"speculative decoding, offline: {escape(result.model)} "
                    f"(temperature {result.spec.temperature:g}, median of {result.spec.repeats})")
    for col in ("workload", "concurrency", "config", "requests", "output tok/s", "vs off",
                "mean acc. len", "acc. rate %", "drafts"):
        t.add_column(col, justify="left" if col in ("workload", "config") else "right")
    for c in result.cells:
        counts = c.counts
        t.add_row(c.workload, str(c.concurrency), escape(c.config), str(c.num_requests), _f(c.output_tokens_per_s, 1),
                  "-" if c.ratio_vs_off is None else f"{c.ratio_vs_off:.2f}x",
                  _f(counts.mean_acceptance_length if counts else None),
                  _pct_str(counts.acceptance_rate if counts else None), str(counts.num_drafts) if counts else "-")
    # Not a terminal (a pipe, CI logs): do not squeeze the table into 80 columns.
    (console or Console(stderr=True, width=None if sys.stderr.isatty() else 160)).print(t)


def _median(summary: dict, metric: str) -> str:
    return _f((summary.get(metric) or {}).get("median_ms"))


def print_history(runs: Sequence[RunRecord], console: Console | None = None) -> None:
    """One line per run; --json has everything."""
    t = Table(title="bench history (newest first)")
    for col in ("id", "time (UTC)", "kind", "hardware", "model", "label/series", "config", "ok/fail",
                "req/s", "out tok/s", "TTFT p50 ms", "TPOT p50 ms"):
        is_number = col in ("id", "ok/fail", "req/s", "out tok/s", "TTFT p50 ms", "TPOT p50 ms")
        t.add_column(col, justify="right" if is_number else "left", overflow="fold")
    for r in runs:
        s = r.summary
        ok_fail = f"{s.get('num_completed', '-')}/{s.get('num_failed', '-')}" if r.kind == "serve" else "-"
        t.add_row(str(r.id), r.created_at[:16].replace("T", " "), r.kind + (" (int)" if r.interrupted else ""),
                  escape(r.hardware_sku), escape(r.model), escape(r.label or r.series),
                  config_hash(r.server) or "-", ok_fail,
                  _f(s.get("request_throughput")), _f(s.get("output_throughput")), _median(s, "ttft"),
                  _median(s, "tpot"))
    # Not a terminal (a pipe, CI logs): do not squeeze the table into 80 columns.
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(t)


def print_comparison(comps: Sequence[MetricComparison], console: Console | None = None) -> None:
    t = Table(title="compare: new vs base")
    for col in ("metric", "base", "new", "new/base", "p-value", "verdict"):
        t.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for c in comps:
        style = "bold red" if c.verdict == REGRESSION else "bold green" if c.verdict == IMPROVEMENT else ""
        p = "-" if c.p_value is None else f"{c.p_value:.3g}"
        t.add_row(f"{c.name} ({'median ' if c.unit == 'ms' else ''}{c.unit})", _f(c.base_value),
                  _f(c.new_value), _f(c.ratio, 3), p, f"[{style}]{c.verdict}[/]" if style else c.verdict)
    (console or Console()).print(t)


def print_costs(rows: Sequence[CostRow], notes: Sequence[str], as_of: str,
                console: Console = err_console) -> None:
    if rows:
        t = Table(title=f"cost at list prices as of {as_of} (assumptions; edit prices.toml)")
        for col in ("instance", "$/hour", "basis", "$/1M output tok", "$/1M total tok"):
            t.add_column(col, justify="left" if col in ("instance", "basis") else "right")
        for c in rows:
            t.add_row(c.instance, _f(c.usd_per_hour, 3), c.basis, _f(c.usd_per_1m_output, 3),
                      _f(c.usd_per_1m_total, 3))
        console.print(t)
    for n in notes:
        console.print(f"[dim]{escape(n)}[/]")
