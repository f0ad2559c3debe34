"""Serving metrics, defined exactly as vLLM's `bench serve` (docs/bench.md has the table).

Per completed request:
  TTFT = arrival of the first token chunk - send time.
  E2EL = arrival of the last token chunk - send time.
  TPOT = (E2EL - TTFT) / (output_tokens - 1), only when output_tokens > 1.
  ITL  = every gap between consecutive token chunks; a chunk carrying k tokens contributes
         k samples of gap/k, so batched or speculative chunks do not inflate ITL. Tokens
         riding in the first chunk arrived with the first token and add no ITL samples.
Run level: throughputs divide by the benchmark duration; failed and incomplete requests are
counted apart and never enter latency statistics or throughput.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from tokenmill.bench.schema import LatencyStats, RequestSample, RunSummary

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def request_tpot_s(sample: RequestSample) -> float | None:
    """TPOT of one request in seconds; None when it produced fewer than 2 tokens."""
    if sample.output_tokens < 2 or sample.ttft_s is None or sample.e2e_s is None:
        return None
    return (sample.e2e_s - sample.ttft_s) / (sample.output_tokens - 1)


def request_itls_s(sample: RequestSample) -> list[float]:
    """Inter-token latencies of one request in seconds, one per token after the first chunk."""
    times, tokens = sample.chunk_times_s, sample.chunk_tokens
    itls: list[float] = []
    for i in range(1, len(times)):
        k = max(1, tokens[i] if i < len(tokens) else 1)
        itls.extend([(times[i] - times[i - 1]) / k] * k)
    return itls


def per_request_values_s(samples: Sequence[RequestSample]) -> dict[str, np.ndarray]:
    """Latency samples of completed requests, in seconds, keyed by metric name.

    Args:
        samples: any mix of statuses; only "ok" requests are used.

    Returns:
        {"ttft", "tpot", "itl", "e2el"} -> 1-D arrays (tpot skips 1-token requests; itl holds
        every token gap of every request).
    """
    ok = [s for s in samples if s.status == "ok"]
    tpots = [t for t in (request_tpot_s(s) for s in ok) if t is not None]
    itls = [x for s in ok for x in request_itls_s(s)]
    return {
        "ttft": np.array([s.ttft_s for s in ok], dtype=np.float64),
        "tpot": np.array(tpots, dtype=np.float64),
        "itl": np.array(itls, dtype=np.float64),
        "e2el": np.array([s.e2e_s for s in ok], dtype=np.float64),
    }


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def latency_stats(values_s: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> LatencyStats:
    """Mean, median, population std, min, max and percentiles (numpy linear) in ms.

    Args:
        values_s: samples in seconds (may be empty: every field is then 0 and count 0).
        percentiles: which percentiles to report, e.g. (50, 90, 99).

    Returns:
        LatencyStats in milliseconds.
    """
    v = np.asarray(values_s, dtype=np.float64) * 1000.0
    if v.size == 0:
        return LatencyStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, {percentile_key(p): 0.0 for p in percentiles})
    return LatencyStats(
        count=int(v.size),
        mean_ms=float(np.mean(v)),
        median_ms=float(np.median(v)),
        std_ms=float(np.std(v)),
        min_ms=float(np.min(v)),
        max_ms=float(np.max(v)),
        percentiles_ms={percentile_key(p): float(np.percentile(v, p)) for p in percentiles},
    )


def parse_slos(text: str | Sequence[str] | None) -> dict[str, float]:
    """Parse SLOs like "ttft=500,tpot=50" or vLLM's "ttft:500 tpot:50" into {metric: ms}.

    Values are milliseconds; a suffix "ms" or "s" is accepted ("ttft=0.5s").

    Args:
        text: one string, or several (argparse nargs); None or empty: no SLOs.

    Returns:
        {"ttft"|"tpot"|"e2el": bound_ms}.

    Raises:
        ValueError: unknown metric, or a value that is not a positive number.
    """
    if not text:
        return {}
    parts = [text] if isinstance(text, str) else list(text)
    slos: dict[str, float] = {}
    for item in (p for part in parts for p in re.split(r"[,\s]+", part) if p):
        m = re.fullmatch(r"(\w+)[=:]([0-9.eE+-]+)(ms|s)?", item.strip())
        if not m or m.group(1).lower() not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected METRIC=MS with METRIC in {SLO_METRICS}")
        value = float(m.group(2)) * (1000.0 if m.group(3) == "s" else 1.0)
        if not value > 0:
            raise ValueError(f"SLO {item!r} must be positive")
        slos[m.group(1).lower()] = value
    return slos


def meets_slos(sample: RequestSample, slos_ms: dict[str, float]) -> bool:
    """Whether a request met every SLO; bounds are inclusive and a failed request never does.

    A request with one output token has no TPOT and meets any TPOT bound (as in vLLM).
    """
    if sample.status != "ok":
        return False
    values_s = {"ttft": sample.ttft_s, "tpot": request_tpot_s(sample) or 0.0, "e2el": sample.e2e_s}
    return all((values_s[m] or 0.0) * 1000.0 <= bound for m, bound in slos_ms.items())


def summarize(
    samples: Sequence[RequestSample],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    slos_ms: dict[str, float] | None = None,
) -> RunSummary:
    """Run-level metrics from per-request samples.

    Args:
        samples: every measured request (warm-ups excluded), any status.
        duration_s: wall time of the measured part of the run (first send to last finish).
        percentiles: reported percentiles.
        slos_ms: SLO bounds for goodput; None or empty: goodput is not computed.

    Returns:
        RunSummary. Attainment divides by completed + failed requests (incomplete ones were
        cut short by the client, not by the server, so they count for neither side).
    """
    ok = [s for s in samples if s.status == "ok"]
    num_failed = sum(s.status == "error" for s in samples)
    num_incomplete = sum(s.status == "incomplete" for s in samples)
    total_in = sum(s.prompt_tokens for s in ok)
    total_out = sum(s.output_tokens for s in ok)
    dur = max(duration_s, 1e-9)
    values = per_request_values_s(samples)
    goodput = attainment = None
    if slos_ms:
        num_good = sum(meets_slos(s, slos_ms) for s in ok)
        goodput = num_good / dur
        judged = len(ok) + num_failed
        attainment = num_good / judged if judged else 0.0
    return RunSummary(
        duration_s=duration_s,
        num_completed=len(ok),
        num_failed=num_failed,
        num_incomplete=num_incomplete,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / dur,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        ttft=latency_stats(values["ttft"], percentiles),
        tpot=latency_stats(values["tpot"], percentiles),
        itl=latency_stats(values["itl"], percentiles),
        e2el=latency_stats(values["e2el"], percentiles),
        slos_ms=dict(slos_ms or {}),
        goodput=goodput,
        slo_attainment=attainment,
    )
