"""Signals derived from a metrics recording, for the fault harness's plots and its "what moved"
tables: gauges as read, counters as per-second rates, histograms as window means.

A recording is what `tokenmill watch` sees (observability/metrics_source.py: raw series,
counters cumulative, one snapshot per scrape). These derivations are the harness's ground
truth about a fault, read after the run; the watcher makes its own, live. Everything here is
pure: lists of snapshots in, lists of (unix time, value) out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenmill.observability.metrics_source import Snapshot, counter_increase, split_key

# A rate or mean over this many seconds: one scrape per second is too noisy at the request
# rates of a 2-core machine (a few requests per second), a minute too slow to show onset.
DEFAULT_WINDOW_S = 5.0

SignalKind = Literal["gauge", "rate", "mean", "gap"]
Aggregate = Literal["sum", "max", "min"]
Series = list[tuple[float, float]]  # (unix time, value)


@dataclass(frozen=True)
class SignalDef:
    """One derived signal.

    Label patterns match a label's value exactly, one of several ("length|stop"), or a status
    class: "5xx" matches "500"..."599".
    """

    name: str  # short id, with its unit: "itl_mean_s", "prompt_tokens_per_s"
    title: str  # for plots
    kind: SignalKind  # gauge: as read; rate: counter per second; mean: histogram window mean;
    #                   gap: counter `metric` minus counter `other` (e.g. finished but not sent)
    metric: str  # series name (histograms: without _sum/_count)
    labels: tuple[tuple[str, str], ...] = ()  # label patterns the series must match
    aggregate: Aggregate = "sum"  # over the series that match (instances, label values)
    other: str = ""  # gap: the subtracted counter
    other_labels: tuple[tuple[str, str], ...] = ()


SIGNALS: tuple[SignalDef, ...] = (
    SignalDef("running", "requests running", "gauge", "tokenmill:num_requests_running"),
    SignalDef("waiting", "requests waiting", "gauge", "tokenmill:num_requests_waiting"),
    SignalDef("kv_usage", "KV cache usage (max over servers)", "gauge", "tokenmill:kv_cache_usage_perc",
              aggregate="max"),
    SignalDef("prompt_tokens_per_s", "prompt tokens/s", "rate", "tokenmill:prompt_tokens_total"),
    SignalDef("generation_tokens_per_s", "generation tokens/s", "rate", "tokenmill:generation_tokens_total"),
    SignalDef("preemptions_per_s", "preemptions/s", "rate", "tokenmill:num_preemptions_total"),
    SignalDef("ttft_mean_s", "mean TTFT (s)", "mean", "tokenmill:time_to_first_token_seconds"),
    SignalDef("itl_mean_s", "mean ITL (s)", "mean", "tokenmill:inter_token_latency_seconds"),
    SignalDef("queue_mean_s", "mean queue time (s)", "mean", "tokenmill:request_queue_time_seconds"),
    SignalDef("e2e_mean_s", "mean e2e latency (s)", "mean", "tokenmill:e2e_request_latency_seconds"),
    SignalDef("finished_per_s", "requests finished/s (engine)", "rate", "tokenmill:request_success_total",
              (("finished_reason", "length|stop"),)),
    SignalDef("aborts_per_s", "requests aborted/s (engine)", "rate", "tokenmill:request_success_total",
              (("finished_reason", "abort"),)),
    SignalDef("http_2xx_per_s", "HTTP 2xx/s (completions)", "rate", "http_requests_total",
              (("handler", "/v1/completions"), ("status", "2xx"))),
    SignalDef("http_499_per_s", "HTTP 499/s (client left)", "rate", "http_requests_total", (("status", "499"),)),
    SignalDef("http_5xx_per_s", "HTTP 5xx/s", "rate", "http_requests_total", (("status", "5xx"),)),
    # Requests the engine finished minus completions answered 200. Above 0: responses still
    # open after the engine is done (a client reading slowly enough to fill the kernel's
    # buffers). Below 0: 200s the engine aborted (the client hung up mid-stream; the status
    # line had been sent, so the access count says 200, not 499).
    SignalDef("finished_minus_http_200", "engine finished - HTTP 200", "gap", "tokenmill:request_success_total",
              (("finished_reason", "length|stop"),), other="http_requests_total",
              other_labels=(("handler", "/v1/completions"), ("status", "2xx"))),
    SignalDef("cpu_s_per_s", "server CPU s/s", "rate", "process_cpu_seconds_total"),
    SignalDef("up_min", "endpoints up (min)", "gauge", "up", aggregate="min"),
    SignalDef("gw_backends_healthy", "gateway: backends healthy", "gauge", "tokenmill:gateway_backend_healthy"),
    SignalDef("gw_retries_per_s", "gateway: retries/s", "rate", "tokenmill:gateway_retries_total"),
    SignalDef("gw_5xx_per_s", "gateway: 5xx/s", "rate", "tokenmill:gateway_requests_total", (("status", "5xx"),)),
)
SIGNALS_BY_NAME = {s.name: s for s in SIGNALS}


@functools.lru_cache(maxsize=8192)
def _parsed(key: str) -> tuple[str, dict[str, str]]:
    return split_key(key)  # keys repeat in every snapshot: parse each once


def _matches(labels: dict[str, str], patterns: tuple[tuple[str, str], ...]) -> bool:
    for name, pattern in patterns:
        value = labels.get(name)
        if value is None:
            return False
        if pattern.endswith("xx") and len(pattern) == 3:
            if not value.startswith(pattern[0]):
                return False
        elif value not in pattern.split("|"):
            return False
    return True


def matching(snapshot: Snapshot, metric: str, patterns: tuple[tuple[str, str], ...] = ()) -> dict[str, float]:
    """The series of one snapshot that match, by key."""
    return {key: v for key, v in snapshot.values.items()
            if _parsed(key)[0] == metric and _matches(_parsed(key)[1], patterns)}


def read_value(snapshot: Snapshot, metric: str, patterns: tuple[tuple[str, str], ...] = (),
               aggregate: Aggregate = "sum") -> float | None:
    """The matching series of one snapshot, aggregated; None when none matches."""
    found = list(matching(snapshot, metric, patterns).values())
    if not found:
        return None
    return {"sum": sum, "max": max, "min": min}[aggregate](found)


def _window_starts(times: Sequence[float], window_s: float) -> list[int | None]:
    """For each i, the index of the earliest sample at most window_s before it (None: none)."""
    out: list[int | None] = []
    j = 0
    for i, t in enumerate(times):
        while j < i and t - times[j] > window_s:
            j += 1
        out.append(j if j < i else None)
    return out


def derive(snapshots: Sequence[Snapshot], signal: SignalDef, window_s: float = DEFAULT_WINDOW_S) -> Series:
    """One signal over a recording: points only where it is defined (a rate needs two scrapes,
    a mean needs observations in its window)."""
    times = [s.time_s for s in snapshots]
    if signal.kind == "gauge":
        values = [read_value(s, signal.metric, signal.labels, signal.aggregate) for s in snapshots]
        return [(t, v) for t, v in zip(times, values) if v is not None]
    if signal.kind == "gap":
        out: Series = []
        for s in snapshots:
            a = read_value(s, signal.metric, signal.labels)
            b = read_value(s, signal.other, signal.other_labels)
            if a is not None and b is not None:
                out.append((s.time_s, a - b))
        return out
    starts = _window_starts(times, window_s)
    if signal.kind == "rate":
        series = [matching(s, signal.metric, signal.labels) for s in snapshots]
        rates = [(times[i], counter_increase(series[j], series[i]), times[i] - times[j])
                 for i, j in enumerate(starts) if j is not None]
        return [(t, inc / span_s) for t, inc, span_s in rates if inc is not None and span_s > 0]
    sums = [matching(s, signal.metric + "_sum", signal.labels) for s in snapshots]
    counts = [matching(s, signal.metric + "_count", signal.labels) for s in snapshots]
    out = []
    for i, j in enumerate(starts):
        if j is None:
            continue
        num, total = counter_increase(counts[j], counts[i]), counter_increase(sums[j], sums[i])
        if num and total is not None:
            out.append((times[i], total / num))
    return out


@dataclass(frozen=True)
class Movement:
    """How one signal behaved around a fault."""

    signal: str
    before_mean: float  # over the settled warm-up (after `settle_s`, before injection)
    before_std: float
    during_mean: float  # from injection to removal
    during_peak: float  # the value farthest from before_mean during the fault
    onset_s: float | None  # seconds from injection to the first point outside the normal band
    is_moved: bool  # outside the band for at least `min_points` points during the fault

    @property
    def change(self) -> str:
        if self.before_mean == 0:
            return "from 0"
        return f"x{self.during_mean / self.before_mean:.2f}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def movement(series: Series, name: str, injected_at_s: float, removed_at_s: float, settle_s: float = 20.0,
             num_sigmas: float = 4.0, min_relative: float = 0.25, min_points: int = 3) -> Movement | None:
    """Compare a signal during the fault with its settled warm-up.

    The normal band is before_mean +- max(num_sigmas * std, min_relative * |mean|): a quiet
    signal (std near 0) must still change by a quarter to count; a signal that was always 0
    moves with any nonzero value. None when the signal has no points before or during.
    """
    if not series:
        return None
    start = series[0][0] + settle_s
    before = [v for t, v in series if start <= t < injected_at_s]
    during = [(t, v) for t, v in series if injected_at_s <= t < removed_at_s]
    if not before or not during:
        return None
    mean, std = _mean_std(before)
    band = max(num_sigmas * std, min_relative * abs(mean), 1e-9)
    outside = [(t, v) for t, v in during if abs(v - mean) > band]
    peak = max((v for _, v in during), key=lambda v: abs(v - mean))
    return Movement(name, mean, std, _mean_std([v for _, v in during])[0], peak,
                    outside[0][0] - injected_at_s if outside else None, len(outside) >= min_points)


def movements(snapshots: Sequence[Snapshot], injected_at_s: float, removed_at_s: float,
              signals: Sequence[SignalDef] = SIGNALS, window_s: float = DEFAULT_WINDOW_S) -> list[Movement]:
    """Every signal's movement around the fault, the moved ones first, earliest onset first."""
    out = [m for s in signals
           if (m := movement(derive(snapshots, s, window_s), s.name, injected_at_s, removed_at_s)) is not None]
    return sorted(out, key=lambda m: (not m.is_moved, m.onset_s if m.onset_s is not None else math.inf))
