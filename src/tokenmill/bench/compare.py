"""A/B verdicts between two runs, or two groups of repeated runs.

Latency metrics (TTFT, TPOT, ITL, E2EL): the per-request samples of each side are pooled
and compared with a two-sided Mann-Whitney U test. A change is a regression (or an
improvement) only if BOTH the test is significant (p < alpha) AND the medians differ by at
least the minimum effect (default 5%): significance alone flags trivial shifts on large
samples, effect size alone flags noise on small ones.
Throughput metrics are one number per run: with >= 2 runs per side they get Welch's t-test
plus the same effect threshold on the means; with single runs they are shown, not judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenmill.bench.metrics import per_request_values_s
from tokenmill.bench.schema import RunRecord
from tokenmill.bench.stats import mann_whitney_u, welch_t_test

REGRESSION, IMPROVEMENT, NO_CHANGE, NOT_TESTED = (
    "regression", "improvement", "no significant change", "not tested")
LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
THROUGHPUT_NAMES = {
    "request_throughput": "requests/s",
    "output_throughput": "output tok/s",
    "total_token_throughput": "total tok/s",
    "goodput": "goodput req/s",
}


@dataclass(frozen=True)
class MetricComparison:
    """One metric of an A/B comparison."""

    metric: str  # key, e.g. "ttft" or "output_throughput"
    name: str  # display name
    unit: str  # "ms" for latencies (medians), else the throughput unit
    base_value: float  # median of pooled samples (latency) or mean over runs (throughput)
    new_value: float
    ratio: float  # new / base (nan when base is 0)
    p_value: float | None  # None when not tested
    method: str  # test used, or why none
    verdict: str
    is_lower_better: bool
    base_n: int  # samples (latency) or runs (throughput) on each side
    new_n: int


def _verdict(ratio: float, p: float, lower_better: bool, alpha: float, min_effect: float) -> str:
    if not np.isfinite(ratio) or p >= alpha or abs(ratio - 1.0) < min_effect:
        return NO_CHANGE
    is_worse = ratio > 1.0 if lower_better else ratio < 1.0
    return REGRESSION if is_worse else IMPROVEMENT


def _ratio(new: float, base: float) -> float:
    return new / base if base else float("nan")


def compare_runs(
    base: Sequence[RunRecord], new: Sequence[RunRecord], alpha: float = 0.05, min_effect: float = 0.05
) -> list[MetricComparison]:
    """Compare two groups of runs (a group may hold a single run).

    Args:
        base: baseline runs, with samples loaded.
        new: candidate runs, with samples loaded.
        alpha: significance level of the two-sided tests.
        min_effect: smallest relative change that counts (0.05 = 5%).

    Returns:
        One MetricComparison per latency metric with samples on both sides, then per
        throughput metric present in both sides' summaries.
    """
    if not base or not new:
        raise ValueError("both sides need at least one run")
    out: list[MetricComparison] = []
    base_vals = per_request_values_s([s for r in base for s in r.samples])
    new_vals = per_request_values_s([s for r in new for s in r.samples])
    for key, name in LATENCY_NAMES.items():
        b, n = base_vals[key], new_vals[key]
        if len(b) == 0 or len(n) == 0:
            continue
        test = mann_whitney_u(b, n)
        b_med, n_med = float(np.median(b)) * 1e3, float(np.median(n)) * 1e3
        ratio = _ratio(n_med, b_med)
        out.append(MetricComparison(key, name, "ms", b_med, n_med, ratio, test.p_value, test.method,
                                    _verdict(ratio, test.p_value, True, alpha, min_effect), True,
                                    len(b), len(n)))
    for key, name in THROUGHPUT_NAMES.items():
        b = [float(r.summary[key]) for r in base if r.summary.get(key) is not None]
        n = [float(r.summary[key]) for r in new if r.summary.get(key) is not None]
        if len(b) != len(base) or len(n) != len(new):
            continue
        ratio = _ratio(float(np.mean(n)), float(np.mean(b)))
        if len(b) >= 2 and len(n) >= 2:
            test = welch_t_test(np.array(b), np.array(n))
            verdict = _verdict(ratio, test.p_value, False, alpha, min_effect)
            p, method = test.p_value, test.method
        else:
            p, method, verdict = None, "one run per side: repeat runs to test", NOT_TESTED
        out.append(MetricComparison(key, name, name.split()[-1], float(np.mean(b)), float(np.mean(n)),
                                    ratio, p, method, verdict, False, len(b), len(n)))
    return out


def has_regression(comparisons: Sequence[MetricComparison]) -> bool:
    return any(c.verdict == REGRESSION for c in comparisons)


def parse_run_group(text: str) -> list[int]:
    """Run ids from "12", "3,4,5" or a range "3-5".

    Raises:
        ValueError: not ids.
    """
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            ids.extend(range(lo, hi + 1))
        elif part:
            ids.append(int(part))
    if not ids:
        raise ValueError(f"no run ids in {text!r}")
    return ids
