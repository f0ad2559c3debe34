"""`bench report`: one self-contained HTML file (inline CSS and SVG, no external URLs).

Sections: runs overview, latency CDFs, throughput and latency vs request rate (per sweep or
capacity series), percentile tables, speculative decoding acceptance (only when a run has
it), A/B comparison with verdicts, cost per 1M tokens.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape

from tokenmill.bench.compare import LATENCY_NAMES, MetricComparison
from tokenmill.bench.cost import PriceTable, cost_rows
from tokenmill.bench.metrics import LATENCY_METRICS, per_request_values_s
from tokenmill.bench.schema import RunRecord
from tokenmill.bench.svg import Series, cdf_series, line_chart

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.regression{color:#b00;font-weight:bold}.improvement{color:#070;font-weight:bold}
.note{color:#666;font-size:12px}.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #eee}svg text{font-size:11px;fill:#333}
svg .title{font-size:13px;font-weight:bold}svg .grid{stroke:#eee}svg .plot{fill:none;stroke:#ccc}
"""


def _num(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-" if math.isnan(v) else "inf"
        return f"{v:.{digits}g}"
    return escape(str(v))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], left_cols: int = 1,
           row_classes: Sequence[str] | None = None) -> str:
    def cell(tag: str, i: int, v: object) -> str:
        cls = ' class="l"' if i < left_cols else ""
        return f"<{tag}{cls}>{v if isinstance(v, str) else _num(v)}</{tag}>"

    head = "".join(cell("th", i, escape(h)) for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def run_label(run: RunRecord) -> str:
    """Short legend text: id, label or model, load point."""
    load = run.workload.get("load", {})
    point = ""
    if run.kind == "serve":
        rate = load.get("request_rate")
        point = f" @{rate} req/s" if rate not in (None, "inf") else f" c={load.get('max_concurrency')}"
    return f"#{run.id} {run.label or run.model}{point}"


def _pct(summary: dict, metric: str, key: str) -> float | None:
    return (summary.get(metric) or {}).get("percentiles_ms", {}).get(key)


def _overview(runs: Sequence[RunRecord]) -> str:
    rows = []
    for r in runs:
        s = r.summary
        p = functools.partial(_pct, s)
        rows.append([str(r.id), escape(r.created_at), r.kind, escape(r.hardware_sku), escape(r.model),
                     escape(run_label(r)), s.get("num_completed"), s.get("num_failed"), s.get("num_incomplete"),
                     s.get("request_throughput"), s.get("output_throughput"), p("ttft", "p50"), p("ttft", "p99"),
                     p("tpot", "p50"), p("tpot", "p99"), "yes" if r.interrupted else ""])
    return _table(["id", "time (UTC)", "kind", "hardware", "model", "run", "ok", "failed", "incomplete",
                   "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                   "interrupted"], rows, left_cols=6)


def _cdfs(runs: Sequence[RunRecord]) -> str:
    with_samples = [r for r in runs if r.samples][:8]
    if not with_samples:
        return '<p class="note">No per-request samples in the selected runs.</p>'
    values = {r.id: per_request_values_s(r.samples) for r in with_samples}
    charts = []
    for m in LATENCY_METRICS:
        series = [cdf_series(run_label(r), values[r.id][m] * 1e3) for r in with_samples if len(values[r.id][m])]
        charts.append(line_chart(series, f"{LATENCY_NAMES[m]} CDF", f"{LATENCY_NAMES[m]} (ms)",
                                 "fraction of samples", legend_bottom=True))
    return f'<div class="charts">{"".join(charts)}</div>'


def _load_x(run: RunRecord) -> tuple[float, str] | None:
    load = run.workload.get("load", {})
    rate = load.get("request_rate")
    if rate not in (None, "inf"):
        return float(rate), "request rate (req/s)"
    if load.get("max_concurrency"):
        return float(load["max_concurrency"]), "max concurrency"
    return None


def _pct_series(summaries: Sequence[dict], metric: str, key: str) -> list[float]:
    """One percentile of one metric across the points of a sweep (nan where not reported)."""
    return [x[metric]["percentiles_ms"].get(key, math.nan) for x in summaries]


def _sweeps(runs: Sequence[RunRecord]) -> str:
    groups: dict[str, list[tuple[float, str, RunRecord]]] = defaultdict(list)  # series -> (x, x label, run)
    for r in runs:
        x = _load_x(r) if r.kind == "serve" and r.series else None
        if x:
            groups[r.series].append((*x, r))
    parts = []
    for series, points in groups.items():
        if len(points) < 2:
            continue
        points.sort(key=lambda p: p[0])
        xs = [x for x, _, _ in points]
        x_label = points[0][1]
        s = [r.summary for _, _, r in points]
        charts = [
            line_chart([Series("output tok/s", xs, [x["output_throughput"] for x in s], True),
                        Series("total tok/s", xs, [x["total_token_throughput"] for x in s], True)],
                       "Throughput", x_label, "tokens/s"),
            line_chart([Series("TTFT p50", xs, _pct_series(s, "ttft", "p50"), True),
                        Series("TTFT p99", xs, _pct_series(s, "ttft", "p99"), True)], "TTFT", x_label, "ms"),
            line_chart([Series("TPOT p50", xs, _pct_series(s, "tpot", "p50"), True),
                        Series("TPOT p99", xs, _pct_series(s, "tpot", "p99"), True)], "TPOT", x_label, "ms"),
        ]
        parts.append(f"<h3>{escape(series)}</h3><div class=\"charts\">{''.join(charts)}</div>")
    return "".join(parts) or '<p class="note">No sweep with two or more load points in the selection.</p>'


def _percentiles(runs: Sequence[RunRecord]) -> str:
    parts = []
    for r in runs:
        if r.kind != "serve":
            continue
        s = r.summary
        keys = list(s["ttft"]["percentiles_ms"])
        rows = [[LATENCY_NAMES[m], s[m]["count"], s[m]["mean_ms"], s[m]["median_ms"], s[m]["std_ms"],
                 *[s[m]["percentiles_ms"].get(k) for k in keys], s[m]["max_ms"]] for m in LATENCY_METRICS]
        parts.append(f"<h3>{escape(run_label(r))}</h3>" + _table(
            ["metric (ms)", "n", "mean", "median", "std", *keys, "max"], rows))
    return "".join(parts) or '<p class="note">No serve runs selected.</p>'


def _spec_decode(runs: Sequence[RunRecord]) -> str | None:
    """Acceptance of the runs whose server exposed speculative decoding counters; None: none did."""
    rows = []
    for r in runs:
        sd = r.summary.get("spec_decode")
        if sd:
            rate = sd["acceptance_rate"]
            per_pos = " / ".join(f"{v * 100:.1f}" for v in sd["per_position_acceptance_rate"]) or "-"
            rows.append([escape(run_label(r)), sd["mean_acceptance_length"], None if rate is None else rate * 100,
                         sd["num_drafts"], sd["num_draft_tokens"], sd["num_accepted_tokens"], per_pos])
    if not rows:
        return None
    return ('<p class="note">From the server\'s spec_decode counters over the measured requests: mean '
            "acceptance length = 1 + accepted / drafts, acceptance rate = accepted / draft tokens (vLLM's "
            "definitions).</p>" + _table(["run", "mean acceptance length", "acceptance rate %", "drafts",
                                          "draft tokens", "accepted tokens", "per-position acceptance %"], rows))


def _comparison(base: Sequence[RunRecord], new: Sequence[RunRecord], comps: Sequence[MetricComparison],
                alpha: float, min_effect: float) -> str:
    rows = [[c.name, c.unit, c.base_value, c.new_value, c.ratio, c.p_value, escape(c.method), c.verdict]
            for c in comps]
    head = (f"<p>Base: runs {', '.join(str(r.id) for r in base)}; new: runs "
            f"{', '.join(str(r.id) for r in new)}. Verdict = two-sided test at alpha={alpha:g} AND a change of "
            f"at least {min_effect:.0%} (latency: medians of pooled per-request samples, Mann-Whitney U; "
            f"throughput: means over runs, Welch's t, only with 2+ runs per side).</p>")
    return head + _table(["metric", "unit", "base", "new", "new/base", "p-value", "test", "verdict"], rows,
                         left_cols=2, row_classes=[c.verdict if c.verdict in ("regression", "improvement")
                                                   else "" for c in comps])


def _cost(runs: Sequence[RunRecord], prices: PriceTable) -> str:
    priced = [r for r in runs if r.kind in ("serve", "throughput", "capacity")]
    rows, notes = cost_rows(priced, prices)
    table = _table(["run", "hardware", "model", "instance", "$/hour", "basis", "out tok/s", "total tok/s",
                    "$ / 1M output tok", "$ / 1M total tok"],
                   [[str(c.run_id), escape(c.sku), escape(c.model), escape(c.instance), c.usd_per_hour,
                     escape(c.basis), c.output_tokens_per_s, c.total_tokens_per_s, c.usd_per_1m_output,
                     c.usd_per_1m_total] for c in rows], left_cols=4)
    note_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (f'<p class="note">Prices from {escape(prices.path)}: {escape(prices.basis)}, as of '
            f"{escape(prices.as_of)}. They are list-price assumptions, not quotes.</p>{table}"
            + (f'<ul class="note">{note_html}</ul>' if notes else ""))


def build_report(runs: Sequence[RunRecord], prices: PriceTable | None = None,
                 comparison: tuple[Sequence[RunRecord], Sequence[RunRecord], Sequence[MetricComparison]]
                 | None = None, alpha: float = 0.05, min_effect: float = 0.05,
                 title: str = "tokenmill bench report", source: str = "") -> str:
    """Render the report.

    Args:
        runs: runs to show, newest first (serve runs should have samples loaded for CDFs).
        prices: price table for the cost section (None: section omitted).
        comparison: (base runs, new runs, their comparisons) for the A/B section.
        alpha, min_effect: the thresholds the comparison used (for its caption).
        title: page title.
        source: where the runs came from (shown in the header).

    Returns:
        A complete HTML document.
    """
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections = [("Runs", _overview(runs)), ("Latency CDFs", _cdfs(runs)),
                ("Throughput and latency vs load", _sweeps(runs)), ("Percentiles", _percentiles(runs))]
    spec_decode = _spec_decode(runs)
    if spec_decode is not None:
        sections.append(("Speculative decoding", spec_decode))
    if comparison is not None:
        sections.append(("A/B comparison", _comparison(*comparison, alpha, min_effect)))
    if prices is not None:
        sections.append(("Cost per million tokens", _cost(runs, prices)))
    body = "".join(f"<h2>{escape(name)}</h2>{html}" for name, html in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"
            f'<p class="note">Generated {now} from {escape(source)}; {len(runs)} runs. Metric definitions: '
            f"docs/bench.md.</p>{body}</body></html>\n")
