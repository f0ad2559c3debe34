"""`bench gateway` output: the result as Markdown, the command that reproduces it, and the
memory plot as a standalone SVG (drawn with the report's svg.line_chart)."""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import fields
from datetime import datetime, timezone
from importlib import metadata

from tokenmill.bench.gateway_bench import (
    BODY,
    Cell,
    GatewayBenchResult,
    GatewayBenchSpec,
    MemoryResult,
)
from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
from tokenmill.bench.svg import Series, line_chart

# The targets for the added latency, at 500 req/s on a 2-core machine (load generator included).
TARGET_P50_MS, TARGET_P99_MS = 2.0, 10.0
# RSS is "flat" when its slope after the warm-up stays under this (about 10 bytes per request).
FLAT_MIB_PER_100K = 1.0
# Send lag (scheduled -> sent) beyond this means the client could not keep the schedule.
MAX_LAG_P99_MS = 10.0

_FLAGS = {"rates": "--rates", "duration_s": "--duration-s", "warmup_s": "--warmup-s", "passes": "--passes",
          "memory_requests": "--memory-requests", "memory_concurrency": "--memory-concurrency",
          "memory_sample_every": "--memory-sample-every", "memory_warmup_requests": "--memory-warmup-requests",
          "request_timeout_s": "--request-timeout"}


def command_line(spec: GatewayBenchSpec, extra: list[str] | None = None) -> str:
    """The `tokenmill bench gateway` command that reproduces spec (default flags left out)."""
    default, args = GatewayBenchSpec(), ["tokenmill", "bench", "gateway", *(extra or [])]
    for f in fields(spec):
        value = getattr(spec, f.name)
        if value != getattr(default, f.name):
            args += [_FLAGS[f.name], ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"]
    return shlex.join(args)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "| " + " | ".join(["---:"] * len(headers)) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _versions() -> str:
    sw = software_fingerprint()
    commit = f" ({sw['git_commit']})" if sw.get("git_commit") else ""
    libs = []
    for dist in ("aiohttp", "uvicorn", "uvloop", "httptools"):
        try:
            libs.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return f"- Software: tokenmill {sw.get('tokenmill')}{commit}, Python {sw.get('python')}, {', '.join(libs)}"


def _behind(cell: Cell, rate: float) -> bool:
    """The load generator did not keep the schedule, so the latencies there are not the servers' alone."""
    lag = cell.pct_ms(99, "lags_s")
    return cell.achieved_rate < 0.95 * rate or (lag is not None and lag > MAX_LAG_P99_MS)


def _latency_lines(result: GatewayBenchResult) -> list[str]:
    rows, met, behind = [], [], []
    for rate in result.spec.rates:
        d, g = result.cells[("direct", rate)], result.cells[("gateway", rate)]
        if _behind(d, rate) or _behind(g, rate):
            behind.append(f"{rate:g}")
        p = {(n, q): c.pct_ms(q) for n, c in (("d", d), ("g", g)) for q in (50, 99)}
        added = {q: None if p[("g", q)] is None or p[("d", q)] is None else p[("g", q)] - p[("d", q)]
                 for q in (50, 99)}
        if added[50] is not None and added[99] is not None and added[50] < TARGET_P50_MS and added[99] < TARGET_P99_MS:
            met.append(f"{rate:g}")
        rows.append([f"{rate:g}", _ms(p[("d", 50)]), _ms(p[("d", 99)]), _ms(p[("g", 50)]), _ms(p[("g", 99)]),
                     f"**{_ms(added[50])}**", f"**{_ms(added[99])}**",
                     f"{d.achieved_rate:.1f} / {g.achieved_rate:.1f}", f"{len(d.errors)} / {len(g.errors)}",
                     f"{_ms(d.pct_ms(99, 'lags_s'))} / {_ms(g.pct_ms(99, 'lags_s'))}"])
    lines = _table(["rate (req/s)", "direct p50 (ms)", "direct p99 (ms)", "gateway p50 (ms)",
                    "gateway p99 (ms)", "added p50 (ms)", "added p99 (ms)", "achieved req/s (direct / gw)",
                    "errors (direct / gw)", "send lag p99 (ms) (direct / gw)"], rows)
    lines += ["", f"Target: added p50 < {TARGET_P50_MS:g} ms and p99 < {TARGET_P99_MS:g} ms. "
                  f"Met at: {', '.join(met) + ' req/s' if met else 'no rate'}."]
    if behind:
        lines += ["", f"**Load generator behind schedule** at {', '.join(behind)} req/s (achieved < 95% of the "
                      f"rate, or send lag p99 > {MAX_LAG_P99_MS:g} ms): the CPUs were saturated or busy with "
                      "something else; latencies there include queueing in the client."]
    return lines


def _inside_lines(result: GatewayBenchResult) -> list[str]:
    if not result.inside:
        return []
    rows = [[f"{rate:g}", f"{h.count:,.0f}", _ms(h.sum / h.count * 1000 if h.count else None),
             _ms(None if (q := h.quantile(0.5)) is None else q * 1000),
             _ms(None if (q := h.quantile(0.99)) is None else q * 1000)]
            for rate, h in sorted(result.inside.items())]
    return ["", "Added latency measured inside the gateway (its `tokenmill:gateway_added_latency_seconds` "
                "histogram over the measured stretches; p50/p99 interpolated within buckets, as PromQL's "
                "histogram_quantile):", "",
            *_table(["rate (req/s)", "requests", "mean (ms)", "p50 (ms)", "p99 (ms)"], rows)]


def memory_verdict(m: MemoryResult) -> str:
    slope = m.slope_mib_per_100k
    if slope is None:
        return f"no slope: fewer than 2 samples after the {m.warmup_requests:,}-request warm-up"
    word = "flat" if abs(slope) < FLAT_MIB_PER_100K else "GROWING"
    return f"{slope:+.2f} MiB per 100k requests after the first {m.warmup_requests:,}: {word} " \
           f"(flat: under {FLAT_MIB_PER_100K:g})"


def _memory_lines(result: GatewayBenchResult) -> list[str]:
    m, spec = result.memory, result.spec
    if m is None:
        return []
    done = m.series[-1][0]
    mibs = [v for _, v in m.series]
    after = [v for n, v in m.series if n >= m.warmup_requests]
    return ["", f"Resident memory of the gateway process (VmRSS) over {done:,} requests after the latency "
                f"passes, closed loop with "
                f"{spec.memory_concurrency} in flight: {m.elapsed_s:.0f} s, {done / m.elapsed_s:,.0f} req/s, "
                f"{len(m.errors)} errors.", "",
            f"- RSS (MiB): at the start {mibs[0]:.1f}, after the warm-up {f'{after[0]:.1f}' if after else '-'}, "
            f"last {mibs[-1]:.1f}, max {max(mibs):.1f}",
            f"- Slope: {memory_verdict(m)}",
            "- Series (requests: MiB): " + ", ".join(f"{n:,}: {v:.1f}" for n, v in m.series)]


def _error_lines(result: GatewayBenchResult) -> list[str]:
    errors = [e for c in result.cells.values() for e in c.errors] + (result.memory.errors if result.memory else [])
    if not errors:
        return []
    common = Counter(errors).most_common(5)
    return ["", f"**{len(errors)} requests failed.** Most common:", "", *(f"- {n} x `{e}`" for e, n in common)]


def render_markdown(result: GatewayBenchResult, command: str, started_at: datetime | None = None) -> str:
    """The whole result as Markdown: context, latency table, inside histogram, memory, errors."""
    spec, hw = result.spec, hardware_fingerprint()
    when = (started_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M")
    lines = [f"Measured {when} UTC with", "", f"    {command}", "",
             f"- CPU: {hw['cpu_model']}, {hw['cpu_cores']} cores, ISA {', '.join(hw['isa_flags']) or 'none of note'} "
             "(load generator, fake backend and gateway share them)", _versions(),
             f"- Load: open loop at a constant rate; non-streaming `POST /v1/completions` `{BODY.decode()}` "
             f"to the fake backend, directly and through the gateway (with an API key); {spec.passes} "
             f"pass(es) of {spec.duration_s:g} s per target and rate, targets alternating, each after "
             f"{spec.warmup_s:g} s of unrecorded warm-up. Latency: send to the last byte of the response.",
             "", *_latency_lines(result), *_inside_lines(result), *_memory_lines(result), *_error_lines(result)]
    lines += ["", *(f"Note: {n}" for n in result.notes)] if result.notes else []
    return "\n".join(lines) + "\n"


def memory_svg(m: MemoryResult) -> str:
    """The RSS series as a standalone SVG file (the chart the HTML report would draw, plus its CSS)."""
    chart = line_chart([Series("gateway RSS", [n for n, _ in m.series], [v for _, v in m.series], markers=True)],
                       "Gateway resident memory", "requests", "RSS (MiB)", width=720, height=360)
    style = ("<style>text{font:11px sans-serif;fill:#333}.title{font-size:13px;font-weight:bold}"
             ".grid{stroke:#eee}.plot{fill:none;stroke:#ccc}</style>")
    head, _, rest = chart.partition(">")
    return head.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1) + ">" + style + rest + "\n"
