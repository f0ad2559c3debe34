"""`bench gateway`: the open-loop load generator and the memory sampler against two fake
servers (direct vs a second fake standing in for the gateway), the histogram parser, the
Markdown and SVG output and the command line. Short runs: seconds, not the real bench."""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET

import pytest

from tokenmill.bench import cli
from tokenmill.bench.gateway_bench import (
    GatewayBenchSpec,
    Histogram,
    MemoryResult,
    fake_server_process,
    gateway_process,
    parse_histogram,
    rss_mib,
    run_gateway_bench,
)
from tokenmill.bench.gateway_bench_md import (
    command_line,
    memory_svg,
    memory_verdict,
    render_markdown,
)


@pytest.fixture(scope="module")
def pair():
    with fake_server_process() as direct, fake_server_process() as other:
        yield direct, dataclasses.replace(other, name="gateway", api_key="test-key")


def test_latency_and_memory(pair):
    direct, gateway = pair
    spec = GatewayBenchSpec(rates=(50.0,), duration_s=1.0, warmup_s=0.2, passes=1, memory_requests=400,
                            memory_concurrency=8, memory_sample_every=100, memory_warmup_requests=100)
    lines = []
    result = run_gateway_bench(spec, direct, gateway, lines.append)
    assert len(lines) == 2 * 2 + 1  # two lines per measured stretch, one at the end of memory mode
    for name in ("direct", "gateway"):
        cell = result.cells[(name, 50.0)]
        assert len(cell.latencies_s) == 50 and cell.num_responses == 50 and not cell.errors
        assert 40 < cell.achieved_rate < 60
        assert 0 < cell.pct_ms(50) < 100 and cell.pct_ms(99) >= cell.pct_ms(50)
    assert result.num_errors == 0 and not result.inside and result.notes  # a fake has no gateway histogram
    m = result.memory
    assert [n for n, _ in m.series] == [0, 100, 200, 300, 400] and not m.errors
    assert all(10 < mib < 500 for _, mib in m.series) and m.slope_mib_per_100k is not None
    md = render_markdown(result, command_line(spec))
    assert "| 50 |" in md and "| 0 / 0 |" in md and "CPU:" in md and "failed" not in md
    assert "Met at: 50 req/s" in md and "Series (requests: MiB): 0:" in md
    root = ET.fromstring(memory_svg(m))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_errors_are_reported(pair):
    direct, _ = pair
    broken = dataclasses.replace(direct, name="gateway", base_url=f"{direct.base_url}/nope")  # 404s
    spec = GatewayBenchSpec(rates=(40.0,), duration_s=0.5, warmup_s=0.0, passes=1)
    result = run_gateway_bench(spec, direct, broken)
    assert len(result.cells[("gateway", 40.0)].errors) == 20 and result.num_errors == 20
    assert result.cells[("gateway", 40.0)].errors[0].startswith("HTTP 404")
    md = render_markdown(result, "cmd")
    assert "| 0 / 20 |" in md and "**20 requests failed.**" in md and "Met at: no rate" in md


def test_histogram_parse_and_quantile():
    text = "\n".join([
        "# TYPE tokenmill:gateway_added_latency_seconds histogram",
        'tokenmill:gateway_added_latency_seconds_bucket{le="0.001",route="a"} 50.0',
        'tokenmill:gateway_added_latency_seconds_bucket{le="0.002",route="a"} 90.0',
        'tokenmill:gateway_added_latency_seconds_bucket{le="+Inf",route="a"} 100.0',
        'tokenmill:gateway_added_latency_seconds_bucket{route="b",le="0.001"} 10.0',
        'tokenmill:gateway_added_latency_seconds_bucket{route="b",le="0.002"} 10.0',
        'tokenmill:gateway_added_latency_seconds_bucket{route="b",le="+Inf"} 10.0',
        'tokenmill:gateway_added_latency_seconds_sum{route="a"} 0.15',
        'tokenmill:gateway_added_latency_seconds_count{route="a"} 100.0',
        'tokenmill:gateway_added_latency_seconds_sum{route="b"} 0.005',
        'tokenmill:gateway_added_latency_seconds_count{route="b"} 10.0',
        "other_metric 3"])
    h = parse_histogram(text, "tokenmill:gateway_added_latency_seconds")
    assert h.count == 110 and h.sum == pytest.approx(0.155)
    assert h.buckets == {0.001: 60.0, 0.002: 100.0, float("inf"): 110.0}
    assert h.quantile(0.5) == pytest.approx(0.001 * 55 / 60)  # inside the first bucket, from 0
    assert h.quantile(0.9) == pytest.approx(0.001 + 0.001 * (99 - 60) / 40)
    assert h.quantile(0.99) == 0.002  # in +Inf: the highest finite bound, as Prometheus
    delta = h - Histogram({0.001: 60.0, 0.002: 100.0, float("inf"): 100.0}, 0.15, 100)
    assert delta.count == 10 and delta.quantile(0.5) == 0.002
    assert (delta + delta).count == 20
    assert parse_histogram("other 1\n", "tokenmill:gateway_added_latency_seconds") is None
    assert Histogram({}, 0, 0).quantile(0.5) is None


def test_memory_verdict_and_rss():
    flat = MemoryResult([(0, 30.0), (100, 40.0), (200, 40.0), (300, 40.0)], [], 1.0, warmup_requests=100)
    assert flat.slope_mib_per_100k == pytest.approx(0.0, abs=1e-9) and "flat" in memory_verdict(flat)
    leak = MemoryResult([(0, 30.0), (100, 40.0), (200, 41.0), (300, 42.0)], [], 1.0, warmup_requests=100)
    assert leak.slope_mib_per_100k == pytest.approx(1000.0) and "GROWING" in memory_verdict(leak)
    assert MemoryResult([(0, 1.0)], [], 1.0, 100).slope_mib_per_100k is None
    assert rss_mib(os.getpid()) > 10


def test_command_line_and_cli(pair, capsys, tmp_path):
    spec = GatewayBenchSpec(rates=(100.0, 500.0), memory_requests=200_000)
    assert command_line(spec) == "tokenmill bench gateway --memory-requests 200000"
    direct, gateway = pair
    out = tmp_path / "gw.md"
    rc = cli.main(["gateway", "--gateway-url", gateway.base_url, "--backend-url", direct.base_url,
                   "--api-key", "k", "--rates", "30", "--duration-s", "0.5", "--warmup-s", "0.1",
                   "--passes", "2", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and out.read_text() == captured.out
    assert "| 30 |" in captured.out and "--rates 30 --duration-s 0.5" in captured.out
    assert "pass 2/2: gateway at 30 req/s" in captured.err  # the order alternates per pass
    assert cli.main(["gateway", "--gateway-url", gateway.base_url, "--memory-requests", "10"]) == 2


def test_through_real_gateway(tmp_path):
    """The real thing, briefly: fake backend, `tokenmill gateway serve`, an API key, both targets."""
    spec = GatewayBenchSpec(rates=(50.0,), duration_s=0.5, warmup_s=0.1, passes=1, memory_requests=100,
                            memory_sample_every=50, memory_warmup_requests=50)
    with fake_server_process() as direct, gateway_process(direct.base_url, tmp_path) as gateway:
        assert gateway.api_key and gateway.pid
        result = run_gateway_bench(spec, direct, gateway)
    assert result.num_errors == 0, render_markdown(result, "cmd")
    assert len(result.cells[("gateway", 50.0)].latencies_s) == 25 and len(result.memory.series) == 3
