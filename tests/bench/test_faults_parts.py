"""The pure parts of `tokenmill bench faults`: derived signals, movements, scoring, report.
(The harness itself is a benchmark of live processes: not run here.)"""

from __future__ import annotations

import json

import pytest

from tokenmill.bench.fault_report import (
    FaultOutcome,
    foreign_cpu_cores,
    foreign_cpu_peak_cores,
    markdown,
    phase_stats,
    read_incidents,
)
from tokenmill.bench.fault_signals import SIGNALS_BY_NAME, SignalDef, derive, movement, read_value
from tokenmill.bench.faults import update_sidecar
from tokenmill.bench.faults_cli import parse_faults
from tokenmill.bench.schema import RequestSample
from tokenmill.observability.metrics_source import Snapshot

M = 'model_name="demo"'


def test_gauge_sums_and_maxes_over_instances():
    s = Snapshot(0.0, {f'tokenmill:num_requests_running{{instance="a",{M}}}': 2.0,
                       f'tokenmill:num_requests_running{{instance="b",{M}}}': 3.0,
                       f'tokenmill:kv_cache_usage_perc{{instance="a",{M}}}': 0.2,
                       f'tokenmill:kv_cache_usage_perc{{instance="b",{M}}}': 0.7})
    assert read_value(s, "tokenmill:num_requests_running") == 5.0
    assert read_value(s, "tokenmill:kv_cache_usage_perc", aggregate="max") == 0.7
    assert read_value(s, "tokenmill:num_requests_waiting") is None


def test_status_class_patterns():
    s = Snapshot(0.0, {'http_requests_total{handler="/v1/completions",method="POST",status="200"}': 5.0,
                       'http_requests_total{handler="/v1/completions",method="POST",status="503"}': 2.0,
                       'http_requests_total{handler="/v1/completions",method="POST",status="499"}': 1.0})
    assert read_value(s, "http_requests_total", (("status", "5xx"),)) == 2.0
    assert read_value(s, "http_requests_total", (("status", "2xx"), ("handler", "/v1/completions"))) == 5.0
    assert read_value(s, "http_requests_total", (("status", "499"),)) == 1.0


def test_rate_over_window_handles_counter_restart():
    key = f"tokenmill:generation_tokens_total{{{M}}}"
    snaps = [Snapshot(float(t), {key: v}) for t, v in [(0, 0.0), (1, 10.0), (2, 20.0), (3, 5.0), (4, 15.0)]]
    rate = SignalDef("r", "r", "rate", "tokenmill:generation_tokens_total")
    assert derive(snaps, rate, window_s=1.0) == [(1.0, 10.0), (2.0, 10.0), (3.0, 5.0), (4.0, 10.0)]
    assert derive(snaps, rate, window_s=2.0)[1] == (2.0, 10.0)


def test_rate_of_a_vanished_instance_is_not_a_reset_of_the_others():
    def at(t: float, **by_instance: float) -> Snapshot:
        return Snapshot(t, {f'tokenmill:request_success_total{{instance="{i}",{M}}}': v for i, v in by_instance.items()})

    snaps = [at(0, a=100.0, b=100.0), at(1, a=102.0, b=102.0), at(2, b=104.0), at(3, a=1.0, b=106.0)]
    rate = SignalDef("r", "r", "rate", "tokenmill:request_success_total")
    # b alone while a is down; a's restart counts from 0.
    assert derive(snaps, rate, window_s=1.0) == [(1.0, 4.0), (2.0, 2.0), (3.0, 2.0)]


def test_histogram_window_mean_only_where_observed():
    base = "tokenmill:inter_token_latency_seconds"
    rows = [(0, 0.0, 0.0), (1, 1.0, 10.0), (2, 1.0, 10.0), (3, 4.0, 20.0)]
    snaps = [Snapshot(float(t), {f"{base}_sum{{{M}}}": s, f"{base}_count{{{M}}}": c}) for t, s, c in rows]
    mean = derive(snaps, SIGNALS_BY_NAME["itl_mean_s"], window_s=1.0)
    assert mean == [(1.0, 0.1), (3.0, 0.3)]


def test_gap_engine_finished_minus_http_200():
    snaps = [Snapshot(0.0, {f'tokenmill:request_success_total{{finished_reason="length",{M}}}': 10.0,
                            f'tokenmill:request_success_total{{finished_reason="abort",{M}}}': 4.0,
                            'http_requests_total{handler="/v1/completions",method="POST",status="200"}': 7.0,
                            'http_requests_total{handler="/v1/completions",method="POST",status="400"}': 2.0,
                            'http_requests_total{handler="/metrics",method="GET",status="200"}': 50.0})]
    assert derive(snaps, SIGNALS_BY_NAME["finished_minus_http_200"]) == [(0.0, 3.0)]


def test_movement_finds_onset_and_ignores_quiet_signals():
    noisy = [(float(t), 1.0 + 0.01 * (t % 3)) for t in range(100)]
    stepped = [(t, v if t < 60 else v * 3) for t, v in noisy]
    m = movement(stepped, "itl", injected_at_s=58.0, removed_at_s=80.0)
    assert m is not None and m.is_moved and m.onset_s == pytest.approx(2.0)
    assert m.during_mean > 2.5 * m.before_mean
    quiet = movement(noisy, "itl", injected_at_s=58.0, removed_at_s=80.0)
    assert quiet is not None and not quiet.is_moved and quiet.onset_s is None
    from_zero = movement([(float(t), 0.0 if t < 70 else 2.0) for t in range(100)], "preemptions", 58.0, 80.0)
    assert from_zero.is_moved and from_zero.change == "from 0"
    assert movement([], "x", 1.0, 2.0) is None


def test_scoring_first_report_false_alarms_and_cause():
    o = FaultOutcome("cpu_hog", "2 hogs", started_at_s=1000.0, ended_at_s=1200.0, injected_at_s=1090.0,
                     removed_at_s=1135.0, watch_ran=True,
                     incidents=[{"cause": "traffic_surge", "reported_at_s": 1050.0},
                                {"cause": "long_prompt_flood", "reported_at_s": 1110.0},
                                {"cause": "cpu_contention", "reported_at_s": 1098.5}])
    assert [i["reported_at_s"] for i in o.false_alarms] == [1050.0]
    assert o.detection_s == pytest.approx(8.5)
    assert o.is_correct
    clean = FaultOutcome("clean", "steady", 0.0, 300.0, watch_ran=True, incidents=[{"cause": "x", "reported_at_s": 5}])
    assert len(clean.false_alarms) == 1 and clean.first_report is None and not clean.is_correct
    missed = FaultOutcome("small_kv", "kv", 0.0, 10.0, injected_at_s=5.0, removed_at_s=8.0, watch_ran=True)
    assert missed.detection_s is None and not missed.is_correct
    report = markdown([o, clean, missed])
    assert "| cpu_hog | cpu_contention | 8.5 | cpu_contention | yes | 1 | 3 | 200 |" in report
    assert "| clean | (none) | - | - | no | 1 | 1 | 300 |" in report
    assert "| small_kv | kv_cache_pressure | - | - | no | 0 | 0 | 10 |" in report


def test_read_incidents_skips_a_torn_line(tmp_path):
    path = tmp_path / "incidents.jsonl"
    opened = {"event": "opened", "cause": "backend_down", "reported_at_s": 3.0}
    lines = [json.dumps(opened), "", json.dumps({**opened, "event": "resolved"}), '{"cause": "x']
    path.write_text("\n".join(lines))
    assert read_incidents(path) == [opened]
    assert read_incidents(tmp_path / "missing.jsonl") == []


def test_phase_stats_split_by_send_time():
    def sample(start_s: float, status: str = "ok") -> RequestSample:
        return RequestSample(index=0, start_s=start_s, status=status, output_tokens=3,
                             chunk_times_s=[0.1, 0.2, 0.3])

    samples = [sample(1.0), sample(2.0, "error"), sample(15.0), sample(25.0), sample(26.0, "incomplete")]
    phases = phase_stats(samples, load_start_s=100.0, injected_at_s=110.0, removed_at_s=120.0, end_at_s=130.0)
    assert [(p.phase, p.num_requests, p.num_errors) for p in phases] == [
        ("warm-up", 2, 1), ("fault", 1, 0), ("after", 1, 0)]
    assert phases[0].mean_ttft_ms == pytest.approx(100.0) and phases[0].mean_tpot_ms == pytest.approx(100.0)


def test_foreign_cpu_over_phases_and_peak():
    # (time, host busy s, own tree s): others take 1 core from t=20 to t=30 only.
    samples = [(float(t), 0.5 * t + (min(max(t - 20, 0), 10)), 0.5 * t) for t in range(0, 61)]
    assert foreign_cpu_cores(samples, 0.0, 60.0) == pytest.approx(10 / 60)
    assert foreign_cpu_cores(samples, 0.0, 15.0) == pytest.approx(0.0)
    assert foreign_cpu_peak_cores(samples) == pytest.approx(1.0)
    assert foreign_cpu_cores(samples[:1], 0.0, 1.0) is None


def test_sidecar_merges_entries(tmp_path):
    path = tmp_path / "faults.json"
    for name, at in (("small_kv", 10.0), ("cpu_hog", 20.0)):
        update_sidecar(path, name, FaultOutcome(name, "d", 0.0, 99.0, injected_at_s=at, removed_at_s=at + 5))
    data = json.loads(path.read_text())
    assert list(data) == ["cpu_hog", "small_kv"]
    assert data["cpu_hog"]["expected_cause"] == "cpu_contention" and data["small_kv"]["removed_at_s"] == 15.0


def test_parse_faults():
    assert parse_faults("all")[:2] == ["cpu_hog", "long_prompts"] and len(parse_faults("all")) == 5
    assert parse_faults("clean, small_kv,clean") == ["clean", "small_kv"]
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("oom")
