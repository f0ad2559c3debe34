"""Sweep saturation and capacity search logic, with fake probes (no server)."""

from __future__ import annotations

import pytest

from tokenmill.bench.metrics import summarize
from tokenmill.bench.schema import RequestSample, RunRecord
from tokenmill.bench.serve import ServeOutcome, ServeSpec
from tokenmill.bench.sweep import CapacitySpec, SweepSpec, run_capacity, run_sweep


def fake_outcome(spec: ServeSpec, out_tps: float, attainment: float) -> ServeOutcome:
    n = 100
    good = int(round(attainment * n))
    samples = [RequestSample(i, 0.0, "ok", "", 10, 10, "usage", [0.1 if i < good else 9.0] + [9.5] * 9,
                             [1] * 10) for i in range(n)]
    summary = summarize(samples, duration_s=n * 10 / out_tps, slos_ms=spec.slos_ms)
    record = RunRecord("serve", "m", {"load": spec.load.to_dict()}, summary.to_dict(), {"sku": "s"}, {},
                       series=spec.series, id=len(samples))
    return ServeOutcome(record, summary, None)  # type: ignore[arg-type]


def test_auto_sweep_stops_at_saturation():
    seen = []

    def probe(spec):
        rate = spec.load.request_rate
        seen.append(rate)
        return fake_outcome(spec, out_tps=min(rate, 8.0) * 100, attainment=1.0)

    outs = run_sweep(SweepSpec(ServeSpec(), start=1.0, factor=2.0, max_steps=10), probe=probe)
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0]  # 16 gives no gain over 8: saturated
    assert len({o.record.series for o in outs}) == 1 and outs[0].record.series.startswith("sweep-")


def test_explicit_concurrency_sweep_runs_every_point():
    seen = []

    def probe(spec):
        seen.append((spec.load.request_rate, spec.load.max_concurrency))
        return fake_outcome(spec, 100.0, 1.0)

    run_sweep(SweepSpec(ServeSpec(), max_concurrencies=(1, 2, 4)), probe=probe)
    assert seen == [(float("inf"), 1), (float("inf"), 2), (float("inf"), 4)]


@pytest.mark.parametrize("true_capacity", [0.3, 3.0, 10.0, 700.0])
def test_capacity_search_brackets_the_threshold(true_capacity):
    def probe(spec):
        rate = spec.load.request_rate
        return fake_outcome(spec, 100.0, attainment=1.0 if rate <= true_capacity else 0.5)

    spec = CapacitySpec(ServeSpec(slos_ms={"ttft": 200.0}), attainment=0.9, start_rate=1.0, max_rate=1024.0,
                        tolerance=0.05, max_probes=30)
    result = run_capacity(spec, probe=probe)
    assert result.capacity_rps <= true_capacity
    assert result.capacity_rps >= true_capacity / 1.06
    assert result.record is not None and result.record.kind == "capacity"
    assert result.record.summary["capacity_rps"] == result.capacity_rps


def test_capacity_zero_when_nothing_passes_and_needs_slos():
    spec = CapacitySpec(ServeSpec(slos_ms={"ttft": 1.0}), start_rate=1.0)
    result = run_capacity(spec, probe=lambda s: fake_outcome(s, 100.0, 0.0))
    assert result.capacity_rps == 0.0 and result.best is None
    assert all(rate < 1.01 for rate, _, _ in result.probes)
    with pytest.raises(ValueError):
        run_capacity(CapacitySpec(ServeSpec()), probe=lambda s: None)
