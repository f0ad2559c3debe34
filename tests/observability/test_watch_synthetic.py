"""`tokenmill watch` on synthetic metric series: a server under steady Poisson load, with
one known fault switched on at a known time. The series are made the way a server's
counters grow (cumulative, noisy), so the whole path runs: snapshot -> signals -> change
detectors -> diagnosis."""

from __future__ import annotations

import json
import random

import pytest

from tokenmill.observability.metrics_source import Snapshot, series_key
from tokenmill.observability.watch.sinks import alertmanager_payload, terminal_lines
from tokenmill.observability.watch.watcher import Watcher

M = {"model_name": "demo"}
FAULT_AT_S = 200.0


class FakeServer:
    """Counters and gauges of one server; `step` advances one second of traffic."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.c: dict[str, float] = {}
        self.g: dict[str, float] = {}
        self.t = 1_800_000_000.0
        self.unsent = 0  # finished by the engine, response not yet ended

    def add(self, name: str, value: float, **labels: str) -> None:
        key = series_key(name, {**M, **labels})
        self.c[key] = self.c.get(key, 0.0) + value

    def step(self, fault: str | None) -> Snapshot:
        rng = self.rng
        self.t += 1.0
        n = sum(1 for _ in range(20) if rng.random() < 0.2)  # ~4 requests/s
        itl = 0.020 * (1.8 if fault == "cpu_hog" else 1.0)
        prompt_mean = 800 if fault == "long_prompts" else 200
        for _ in range(n):
            prompt = max(8, rng.gauss(prompt_mean, 20))
            ttft = rng.uniform(0.03, 0.07) * prompt / 200 * (1.8 if fault == "cpu_hog" else 1.0)
            self.add("tokenmill:time_to_first_token_seconds_sum", ttft)
            self.add("tokenmill:time_to_first_token_seconds_count", 1)
            self.add("tokenmill:time_to_first_token_seconds_bucket", 1 if ttft <= 1.0 else 0, le="1.0")
            self.add("tokenmill:inter_token_latency_seconds_sum", 63 * itl * rng.uniform(0.9, 1.1))
            self.add("tokenmill:inter_token_latency_seconds_count", 63)
            self.add("tokenmill:e2e_request_latency_seconds_sum", ttft + 63 * itl)
            self.add("tokenmill:e2e_request_latency_seconds_count", 1)
            self.add("tokenmill:request_queue_time_seconds_sum", rng.uniform(0, 0.002))
            self.add("tokenmill:request_queue_time_seconds_count", 1)
            self.add("tokenmill:request_prompt_tokens_sum", prompt)
            self.add("tokenmill:request_prompt_tokens_count", 1)
            self.add("tokenmill:prompt_tokens_total", prompt)
            self.add("tokenmill:generation_tokens_total", 64)
            self.add("tokenmill:request_success_total", 1, finished_reason="length")
            self.unsent += 1
        # Responses end as their clients read them: at once, or a slow reader's tenth a second.
        sent = self.unsent if fault != "slow_readers" else round(self.unsent * 0.1)
        self.add("http_requests_total", sent, handler="/v1/completions", method="POST", status="200")
        self.unsent -= sent
        self.add("tokenmill:num_preemptions_total", rng.randint(1, 3) if fault == "small_kv" else 0)
        self.add("process_cpu_seconds_total", rng.uniform(0.8, 0.95) * (0.6 if fault == "cpu_hog" else 1.0))
        # Little's law: in flight = arrivals x time in the system (~1.3 s, longer when slower).
        in_flight = n * (0.05 + 63 * itl) * rng.uniform(0.8, 1.2)
        gauges = {series_key("tokenmill:num_requests_running", M): float(round(in_flight)),
                  series_key("tokenmill:num_requests_waiting", M): 0.0,
                  series_key("tokenmill:kv_cache_usage_perc", M): (0.97 if fault == "small_kv" else 0.2)
                  + rng.uniform(-0.02, 0.02),
                  series_key("up", {"instance": "127.0.0.1:8000"}): 0.0 if fault == "backend_killed" else 1.0}
        return Snapshot(self.t, {**self.c, **gauges})


def run(fault: str | None, seconds: int = 320, seed: int = 1):
    server, watcher, events = FakeServer(seed), Watcher(), []
    for i in range(seconds):
        snapshot = server.step(fault if fault and i >= FAULT_AT_S else None)
        events += [(snapshot.time_s - server.t + i, e) for e in watcher.observe(snapshot)]
    return events


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_clean_series_raises_nothing(seed):
    assert run(None, seconds=900, seed=seed) == []


@pytest.mark.parametrize("fault, kind, cause", [
    ("cpu_hog", "latency_regression", "cpu_contention"),
    ("long_prompts", "latency_regression", "long_prompt_flood"),
    ("small_kv", "preemption_storm", "kv_cache_pressure"),
    ("slow_readers", "stalled_streams", "slow_clients"),
    ("backend_killed", "backend_down", "backend_down"),
])
def test_each_fault_is_found_with_its_cause(fault, kind, cause):
    events = run(fault)
    opened = [(i, e.incident) for i, e in events if e.opened]
    assert opened, f"{fault}: no incident"
    at, incident = opened[0]
    assert at >= FAULT_AT_S, f"false alarm before the fault at {at}: {incident.summary}"
    assert at - FAULT_AT_S <= 30, f"{fault} found only after {at - FAULT_AT_S:.0f} s"
    assert (incident.cause, incident.kind) == (cause, kind), incident.to_json()
    assert incident.evidence and incident.action
    assert incident.started_at_s <= incident.reported_at_s
    assert len(opened) == 1  # one incident, not one per signal


def test_an_incident_reads_well_and_travels_as_an_alertmanager_webhook():
    events = run("cpu_hog")
    _, first = next((i, e) for i, e in events if e.opened)
    lines = terminal_lines(first)
    assert "INCIDENT" in lines[0] and "cpu contention" in lines[0] and lines[-1].startswith("    action:")
    payload = alertmanager_payload(first)
    assert payload["version"] == "4" and payload["status"] == "firing"
    alert = payload["alerts"][0]
    assert alert["labels"]["alertname"] == "TokenmillLatencyRegression"
    assert alert["labels"]["cause"] == "cpu_contention" and alert["startsAt"].endswith("Z")
    json.dumps(payload)  # serialisable as is
