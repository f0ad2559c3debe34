"""Cost arithmetic, price matching, SVG charts and the HTML report (parsed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from test_bench_compare import synthetic_run

from tokenmill.bench.compare import compare_runs
from tokenmill.bench.cost import (
    PriceTable,
    cost_rows,
    load_prices,
    match_instances,
    usd_per_million,
)
from tokenmill.bench.report import build_report
from tokenmill.bench.svg import Series, cdf_series, line_chart, nice_ticks

PRICES = PriceTable({"cpu-box": {"usd_per_hour": 3.6},
                     "gpu-1x": {"usd_per_hour": 7.2, "gpu": "H100", "gpu_count": 1},
                     "gpu-8x": {"usd_per_hour": 72.0, "gpu": "H100", "gpu_count": 8}},
                    "2025-01-01", "test", "test.toml")


def test_usd_per_million_tokens():
    # $3.60/h = $0.001/s; at 1000 tok/s that is $1e-6 per token = $1 per 1M tokens.
    assert usd_per_million(3.6, 1000.0) == pytest.approx(1.0)
    assert usd_per_million(3.6, 0.0) == float("inf")


def test_cost_rows_match_gpu_or_instance_type():
    gpu = synthetic_run(1)
    gpu.hardware = {"sku": "1x NVIDIA H100 80GB HBM3", "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}
    cpu = synthetic_run(2)
    cpu.instance_type = "cpu-box"
    unpriced = synthetic_run(3)
    assert match_instances(gpu, PRICES) == ["gpu-1x"]
    rows, notes = cost_rows([gpu, cpu, unpriced], PRICES)
    assert [r.instance for r in rows] == ["gpu-1x", "cpu-box"]
    assert rows[1].usd_per_1m_output == pytest.approx(3.6 / 3600 / 100.0 * 1e6)
    assert rows[1].usd_per_1m_total == pytest.approx(3.6 / 3600 / 500.0 * 1e6)
    assert len(notes) == 1 and "not priced" in notes[0]
    cap = synthetic_run(4)
    cap.kind, cap.instance_type = "capacity", "cpu-box"
    cap.summary["capacity_rps"] = 2.5
    assert "SLO capacity (2.5 req/s)" in cost_rows([cap], PRICES)[0][0].basis


def test_bundled_price_table_is_dated_and_valid():
    prices = load_prices()
    assert prices.as_of[:4].isdigit() and "assumption" in prices.basis
    assert all(e["usd_per_hour"] > 0 for e in prices.instances.values())
    assert any(e.get("gpu") == "H100" for e in prices.instances.values())


def test_svg_charts_are_well_formed():
    assert nice_ticks(0, 97) == [0, 20, 40, 60, 80, 100]
    svg = line_chart([cdf_series("a & b", [3.0, 1.0, 2.0]), Series("r", [1, 2], [5, 6], markers=True)],
                     "t<1>", "x", "y")
    root = ET.fromstring(svg)
    assert root.tag == "svg" and "a &amp; b" in svg and "t&lt;1&gt;" in svg
    assert "no data" in line_chart([], "empty", "x", "y")
    ET.fromstring(line_chart([Series("s", [1, 10, 100], [1, 2, 3])], "log", "x", "y", log_x=True))
    big = cdf_series("big", list(range(5000)))
    assert len(big.xs) == 400 and big.ys[-1] == 1.0


def test_report_has_every_section_and_no_external_references(parse_html):
    base, new = synthetic_run(1), synthetic_run(2, slowdown=1.2)
    sweep = []
    for i, rate in enumerate((1.0, 2.0, 4.0)):
        r = synthetic_run(10 + i)
        r.series, r.workload = "sweep-x", {"load": {"request_rate": rate, "max_concurrency": None}}
        r.summary.update(ttft=_stats(), tpot=_stats(), itl=_stats(), e2el=_stats(), num_completed=200)
        r.kind = "serve"
        sweep.append(r)
    for r in (base, new):
        r.summary.update(ttft=_stats(), tpot=_stats(), itl=_stats(), e2el=_stats())
        r.instance_type = "cpu-box"
    html = build_report([new, base, *sweep], PRICES, ([base], [new], compare_runs([base], [new])))
    p = parse_html(html)
    text = " ".join(p.text)
    for needle in ("Latency CDFs", "Throughput and latency vs load", "sweep-x", "Percentiles",
                   "A/B comparison", "regression", "Cost per million tokens", "list-price assumptions"):
        assert needle in text, needle
    assert sum(t == "svg" for t, _ in p.tags) == 4 + 3
    assert "http" not in html and not any(a.get("src") or a.get("href") for _, a in p.tags)


def _stats():
    return {"count": 1, "mean_ms": 1.0, "median_ms": 1.0, "std_ms": 0.0, "min_ms": 1.0, "max_ms": 1.0,
            "percentiles_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0}}
