"""The signals `tokenmill watch` follows, derived from raw metric snapshots.

Each signal is computed over a sliding window (`window_s`, default 10 s) by differencing the
newest snapshot with the one a window earlier: rates of counters, means of histograms
(sum / count of the observations made in the window: steadier than quantiles when a window
holds few requests), and gauges as read. Series are added up over every instance and label
set (one server or several behind a gateway look alike): counters series by series, as
PromQL's sum(increase(...)) (`_Index.increase`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenmill.observability.metrics_source import UP, Snapshot, counter_increase, split_key
from tokenmill.observability.slo import TTFT_SLO

P = "tokenmill:"
GW = "tokenmill:gateway_"


class _Index:
    """One snapshot's series grouped by name."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.time_s = snapshot.time_s
        self.values = snapshot.values
        self.by_name: dict[str, list[tuple[str, dict[str, str], float]]] = {}  # name -> (key, labels, value)
        for key, value in snapshot.values.items():
            name, labels = split_key(key)
            self.by_name.setdefault(name, []).append((key, labels, value))

    def increase(self, since: _Index, name: str, predicate=lambda labels: True) -> float | None:
        """The increase since `since` of the matching series of a counter (counter_increase:
        series by series, so a vanished backend is not read as every survivor resetting)."""
        newer = {key: v for key, labels, v in self.by_name.get(name, ()) if predicate(labels)}
        return counter_increase({k: since.values[k] for k in newer if k in since.values}, newer)

    def total(self, name: str, **match: str) -> float | None:
        rows = self.by_name.get(name)
        if rows is None:
            return None
        return sum(v for _, labels, v in rows if all(labels.get(k) == want for k, want in match.items()))

    def maximum(self, name: str) -> float | None:
        rows = self.by_name.get(name)
        return max(v for _, _, v in rows) if rows else None

    def total_where(self, name: str, predicate) -> float | None:
        rows = self.by_name.get(name)
        return None if rows is None else sum(v for _, labels, v in rows if predicate(labels))

    def down_instances(self) -> set[str]:
        return {labels.get("instance", "?") for _, labels, v in self.by_name.get(UP, ()) if v == 0.0}

    def unhealthy_backends(self) -> set[str]:
        return {labels.get("backend", "?") for _, labels, v in self.by_name.get(GW + "backend_healthy", ()) if v == 0.0}


GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


def _is_5xx(labels: dict[str, str]) -> bool:
    return labels.get("status", labels.get("code", "")).startswith("5")


@dataclass(frozen=True)
class Signals:
    """One window's view. None: not measurable in this window (e.g. no request finished)."""

    time_s: float
    values: dict[str, float | None]  # signal name -> value
    down_instances: frozenset[str]  # scrape endpoints that did not answer
    unhealthy_backends: frozenset[str]  # backends the gateway marks unhealthy


# name -> what it is, for people (evidence lines, docs)
DESCRIPTIONS = {
    "ttft_s": "mean time to first token (s)",
    "itl_s": "mean inter-token latency (s)",
    "e2e_s": "mean request latency (s)",
    "queue_s": "mean time waiting in the queue (s)",
    "ttft_slo_miss_ratio": f"share of requests with TTFT over {TTFT_SLO.threshold_s:g} s",
    "prompt_tokens_per_request": "mean prompt length (tokens)",
    "prompt_tokens_per_s": "prompt tokens processed per second",
    "generation_tokens_per_s": "tokens generated per second",
    "tokens_per_s_per_running": "tokens generated per second per running request",
    "requests_per_s": "requests finished per second",
    "aborts_per_s": "requests aborted per second (clients gone, timeouts)",
    "running": "requests running",
    "waiting": "requests waiting",
    "kv_cache_usage": "KV cache usage (0-1, the fullest replica)",
    "preemptions_per_s": "preemptions per second",
    "prefix_cache_hit_ratio": "prefix cache hit ratio",
    "errors_per_s": "HTTP 5xx responses per second",
    "rejections_per_s": "admission rejections per second",
    "server_cpu": "server CPU use (cores)",
    "ttft_slo_burn": "TTFT error budget burn rate (x budget)",
    "responses_not_yet_sent": "responses finished by the engine but still being sent",
    "streams_waiting_on_client": "streams whose writes wait for the client to read",
    "arrivals_per_s": "requests arriving per second",
}


class SignalDeriver:
    """Keeps the last window of snapshots and turns each new one into `Signals`."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._history: deque[_Index] = deque()

    def add(self, snapshot: Snapshot) -> Signals | None:
        now = _Index(snapshot)
        self._history.append(now)
        # Keep the newest snapshot at least window_s old as the window's start.
        while len(self._history) > 2 and now.time_s - self._history[1].time_s >= self.window_s:
            self._history.popleft()
        then = self._history[0]
        span_s = now.time_s - then.time_s
        if span_s < self.window_s * 0.5:
            return None  # too little history for rates yet
        values = _derive(then, now, span_s)
        running = [r for r in (i.total(P + "num_requests_running") for i in self._history) if r is not None]
        mean_running = sum(running) / len(running) if running else 0.0
        # Throughput at the same load: tokens/s per running request (the window's mean), so
        # that fewer arrivals (less work, not a slower server) do not look like a drop.
        values["tokens_per_s_per_running"] = (None if values["generation_tokens_per_s"] is None
                                              or mean_running < 0.5 else values["generation_tokens_per_s"] / mean_running)
        return Signals(now.time_s, values, frozenset(now.down_instances()), frozenset(now.unhealthy_backends()))


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _derive(then: _Index, now: _Index, span_s: float) -> dict[str, float | None]:
    def d(name: str, **match: str) -> float | None:
        return now.increase(then, name, lambda labels: all(labels.get(k) == v for k, v in match.items()))

    def mean(hist: str) -> float | None:
        return _ratio(d(P + hist + "_sum"), d(P + hist + "_count"))

    def rate(value: float | None) -> float | None:
        return None if value is None else value / span_s

    finished = d(P + "request_success_total")
    aborted = d(P + "request_success_total", finished_reason="abort")
    ttft_count = d(TTFT_SLO.histogram + "_count")
    ttft_fast = d(TTFT_SLO.histogram + "_bucket", le=TTFT_SLO.le)
    errors = now.increase(then, "http_requests_total", _is_5xx)
    # Responses still being written after the engine finished them: slow-reading clients
    # hold them open (a count, not a rate: finished minus answered, all time).
    answered = now.total_where("http_requests_total", lambda labels: labels.get("handler") in GENERATION_ROUTES)
    finished_all = now.total(P + "request_success_total")
    gw_errors = now.increase(then, GW + "requests_total", _is_5xx)
    if gw_errors is not None:
        errors = (errors or 0.0) + gw_errors
    return {
        "ttft_s": mean("time_to_first_token_seconds"),
        "itl_s": mean("inter_token_latency_seconds"),
        "e2e_s": mean("e2e_request_latency_seconds"),
        "queue_s": mean("request_queue_time_seconds"),
        "ttft_slo_miss_ratio": None if not ttft_count or ttft_fast is None else 1.0 - ttft_fast / ttft_count,
        "prompt_tokens_per_request": mean("request_prompt_tokens"),
        "prompt_tokens_per_s": rate(d(P + "prompt_tokens_total")),
        "generation_tokens_per_s": rate(d(P + "generation_tokens_total")),
        "requests_per_s": rate(None if finished is None else finished - (aborted or 0.0)),
        "aborts_per_s": rate(aborted),
        "running": now.total(P + "num_requests_running"),
        "waiting": now.total(P + "num_requests_waiting"),
        "kv_cache_usage": now.maximum(P + "kv_cache_usage_perc"),
        "preemptions_per_s": rate(d(P + "num_preemptions_total")),
        "prefix_cache_hit_ratio": _ratio(d(P + "prefix_cache_hits_total"), d(P + "prefix_cache_queries_total")),
        "errors_per_s": rate(errors),
        "rejections_per_s": rate(d(P + "admission_rejections_total")),
        "server_cpu": rate(d("process_cpu_seconds_total")),
        "streams_waiting_on_client": now.total(P + "num_streams_waiting_on_client"),
        # Arrivals: every request's parameters are observed when it arrives.
        "arrivals_per_s": rate(d(P + "request_params_n_count")),
        "responses_not_yet_sent": None if answered is None or finished_all is None else finished_all - answered,
    }
