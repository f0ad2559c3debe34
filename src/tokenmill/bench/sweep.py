"""`bench sweep` (load points up to saturation) and `bench capacity` (goodput search).

Every load point is an ordinary serve run stored with a shared `series` id, so the report
can draw throughput and latency against request rate, and `compare` works on any point.

Saturation (auto sweeps): output tokens/s grew by less than `min_gain` (5%) over the
previous point, or most requests failed. Offered-vs-achieved request rate is not used:
with a bounded run the drain tail makes achieved < offered even far from saturation.

Capacity: the highest request rate whose SLO attainment (fraction of requests meeting
every SLO, DistServe's goodput criterion) is at least the target. Doubling from a start
rate brackets it, bisection narrows the bracket to `tolerance`. Attainment is measured,
hence noisy: more prompts per probe make the search steadier.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tokenmill.bench.schema import RunRecord
from tokenmill.bench.serve import ServeOutcome, ServeSpec, run_serve, with_load
from tokenmill.bench.store import Store

Probe = Callable[[ServeSpec], ServeOutcome]


def new_series_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True)
class SweepSpec:
    serve: ServeSpec
    request_rates: tuple[float, ...] = ()  # explicit open-loop points
    max_concurrencies: tuple[int, ...] = ()  # explicit closed-loop points
    start: float = 1.0  # auto: first request rate
    factor: float = 2.0  # auto: next = previous * factor
    max_steps: int = 8
    min_gain: float = 0.05


def _is_saturated(prev: ServeOutcome | None, cur: ServeOutcome, min_gain: float) -> bool:
    s = cur.summary
    if s.num_failed > s.num_completed:
        return True
    if prev is None or prev.summary.output_throughput <= 0:
        return False
    return s.output_throughput < prev.summary.output_throughput * (1.0 + min_gain)


def run_sweep(spec: SweepSpec, store: Store | None = None, probe: Probe | None = None,
              on_point: Callable[[ServeOutcome], None] | None = None) -> list[ServeOutcome]:
    """Run the load points of a sweep in order.

    Args:
        spec: points (explicit lists run in full; otherwise rates grow geometrically until
            saturation or max_steps).
        store: where each point is saved.
        probe: runs one point (tests inject a fake); default run_serve.
        on_point: called after each point (the CLI prints a line).

    Returns:
        The outcomes in run order; a Ctrl-C during a point ends the sweep after saving it.
    """
    probe = probe or (lambda s: run_serve(s, store))
    series = spec.serve.series or new_series_id("sweep")
    base = replace(spec.serve, series=series)
    if spec.max_concurrencies:
        points = [with_load(base, request_rate=float("inf"), max_concurrency=c) for c in spec.max_concurrencies]
    elif spec.request_rates:
        points = [with_load(base, request_rate=r) for r in spec.request_rates]
    else:
        points = []
    outcomes: list[ServeOutcome] = []
    for step in range(len(points) if points else spec.max_steps):
        point = points[step] if points else with_load(base, request_rate=spec.start * spec.factor**step)
        outcome = probe(point)
        outcomes.append(outcome)
        if on_point:
            on_point(outcome)
        if outcome.record.interrupted:
            break
        if not points and _is_saturated(outcomes[-2] if len(outcomes) > 1 else None, outcome, spec.min_gain):
            break
    return outcomes


@dataclass(frozen=True)
class CapacitySpec:
    serve: ServeSpec  # serve.slos_ms holds the SLOs
    attainment: float = 0.9
    start_rate: float = 1.0
    max_rate: float = 1024.0
    tolerance: float = 0.1  # stop when (hi - lo) / lo <= tolerance
    max_probes: int = 12


@dataclass
class CapacityResult:
    capacity_rps: float  # 0.0 when even the lowest probed rate missed the target
    probes: list[tuple[float, float, int | None]] = field(default_factory=list)  # (rate, attainment, run id)
    best: ServeOutcome | None = None
    record: RunRecord | None = None


def run_capacity(spec: CapacitySpec, store: Store | None = None, probe: Probe | None = None,
                 on_probe: Callable[[float, ServeOutcome], None] | None = None) -> CapacityResult:
    """Search the highest request rate meeting the SLO attainment target.

    Args:
        spec: SLOs (in spec.serve.slos_ms), target and search bounds.
        store: probes are saved there, then a "capacity" run with the result.
        probe: runs one rate (tests inject a fake); default run_serve.
        on_probe: called after each probe.

    Returns:
        CapacityResult; record is the stored capacity run.
    """
    if not spec.serve.slos_ms:
        raise ValueError("capacity needs at least one SLO (--slo ttft=...,tpot=...)")
    if not 0 < spec.attainment <= 1:
        raise ValueError(f"attainment must be in (0, 1], got {spec.attainment}")
    probe = probe or (lambda s: run_serve(s, store))
    series = spec.serve.series or new_series_id("capacity")
    base = replace(spec.serve, series=series)
    result = CapacityResult(0.0)
    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate
    rate, min_rate = spec.start_rate, spec.start_rate / 64.0
    last: ServeOutcome | None = None
    for _ in range(spec.max_probes):
        outcome = last = probe(with_load(base, request_rate=rate))
        attained = outcome.summary.slo_attainment or 0.0
        result.probes.append((rate, attained, outcome.record.id))
        if on_probe:
            on_probe(rate, outcome)
        if outcome.record.interrupted:
            break
        if attained >= spec.attainment:
            lo, result.best = rate, outcome
            if hi is None and rate >= spec.max_rate:
                break
            rate = min(rate * 2.0, spec.max_rate) if hi is None else (lo + hi) / 2.0
        else:
            hi = rate
            if lo is None and rate / 2.0 < min_rate:
                break
            rate = rate / 2.0 if lo is None else (lo + hi) / 2.0
        if lo is not None and hi is not None and (hi - lo) / lo <= spec.tolerance:
            break
    result.capacity_rps = lo or 0.0
    result.record = _capacity_record(spec, result, series, last)
    if store is not None:
        store.save(result.record)
    return result


def _capacity_record(spec: CapacitySpec, result: CapacityResult, series: str,
                     last: ServeOutcome | None) -> RunRecord:
    best = result.best.record if result.best else None
    s = result.best.summary if result.best else None
    summary = {
        "capacity_rps": result.capacity_rps,
        "attainment_target": spec.attainment,
        "slos_ms": dict(spec.serve.slos_ms),
        "probes": [{"request_rate": r, "slo_attainment": a, "run_id": i} for r, a, i in result.probes],
        "best_run_id": best.id if best else None,
        "slo_attainment": s.slo_attainment if s else None,
        "goodput": s.goodput if s else None,
        "request_throughput": s.request_throughput if s else 0.0,
        "output_throughput": s.output_throughput if s else 0.0,
        "total_token_throughput": s.total_token_throughput if s else 0.0,
    }
    # Context (hardware, server, workload) comes from a probe: the best, else the last one.
    template = best or (last.record if last else RunRecord("serve", spec.serve.model or "", {}, {}, {}, {}))
    return RunRecord(
        kind="capacity", model=template.model, workload=template.workload, summary=summary,
        hardware=template.hardware, software=template.software, server=template.server,
        label=spec.serve.label, series=series, instance_type=spec.serve.instance_type,
        interrupted=bool(last and last.record.interrupted),
    )
