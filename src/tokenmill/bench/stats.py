"""Two-sample tests written with numpy and math only (scipy is not a dependency).

- Mann-Whitney U (two-sided): exact null distribution for small samples without ties,
  else the normal approximation with tie correction and continuity correction.
- Welch's t-test (two-sided), for run-level metrics such as throughput over repeated runs.
- Percentile bootstrap confidence intervals over paired units (the quality lab's chunks).
Both agree with scipy.stats (1.17) on 300 random inputs with and without ties: with scipy
installed, `pytest tests/bench/test_bench_compare.py -k scipy` checks it; without, the tests
keep hand-checked values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Above this many samples per side (or with ties) the normal approximation is used.
_EXACT_MAX_N = 25


@dataclass(frozen=True)
class TestResult:
    statistic: float  # U of the first sample, or Welch's t
    p_value: float  # two-sided
    method: str  # "mwu-exact" | "mwu-normal" | "welch-t"


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get the average of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Boundaries of runs of equal values in the sorted order.
    is_new = np.concatenate(([True], sorted_vals[1:] != sorted_vals[:-1], [True]))
    edges = np.flatnonzero(is_new)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        ranks[order[lo:hi]] = (lo + hi + 1) / 2.0  # mean of ranks lo+1 .. hi
    return ranks


def _u_null_counts(m: int, n: int) -> np.ndarray:
    """Number of orderings giving each U in 0..m*n: coefficients of the Gaussian binomial."""
    size = m * n + 1
    c = np.zeros(size, dtype=np.float64)  # counts stay below 2**53 for m, n <= 25
    c[0] = 1.0
    for i in range(1, m + 1):
        shift = n + i
        if shift < size:
            c[shift:] -= c[:-shift].copy()  # times (1 - q^(n+i))
        for r in range(i):  # divided by (1 - q^i): a running sum with stride i
            c[r::i] = np.cumsum(c[r::i])
    return c


def mann_whitney_u(x: np.ndarray, y: np.ndarray) -> TestResult:
    """Two-sided Mann-Whitney U test of x against y.

    Args:
        x: first sample (e.g. the baseline's per-request TTFTs).
        y: second sample.

    Returns:
        TestResult with U of x (the number of pairs where x > y, ties counting 1/2).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nx, ny = len(x), len(y)
    if nx == 0 or ny == 0:
        raise ValueError("both samples must be non-empty")
    ranks = rankdata(np.concatenate([x, y]))
    u = float(ranks[:nx].sum() - nx * (nx + 1) / 2.0)
    n = nx + ny
    _, tie_counts = np.unique(np.concatenate([x, y]), return_counts=True)
    has_ties = bool(np.any(tie_counts > 1))
    if not has_ties and max(nx, ny) <= _EXACT_MAX_N:
        counts = _u_null_counts(nx, ny)
        total = counts.sum()
        k = int(round(u))
        p_low = counts[: k + 1].sum() / total
        p_high = counts[k:].sum() / total
        return TestResult(u, float(min(1.0, 2.0 * min(p_low, p_high))), "mwu-exact")
    mu = nx * ny / 2.0
    tie_term = float(np.sum(tie_counts.astype(np.float64) ** 3 - tie_counts)) / (n * (n - 1))
    sigma = math.sqrt(nx * ny / 12.0 * ((n + 1) - tie_term))
    if sigma == 0:
        return TestResult(u, 1.0, "mwu-normal")
    z = (abs(u - mu) - 0.5) / sigma
    return TestResult(u, float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0)))), "mwu-normal")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def welch_t_test(x: np.ndarray, y: np.ndarray) -> TestResult:
    """Two-sided Welch t-test (unequal variances). Needs at least 2 values per side."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("Welch's t-test needs at least 2 values per sample")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff = float(y.mean() - x.mean())
    if vx + vy == 0:
        return TestResult(0.0 if diff == 0 else math.copysign(math.inf, diff), 1.0 if diff == 0 else 0.0,
                          "welch-t")
    t = diff / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    p = betainc(df / 2.0, 0.5, df / (df + t * t))
    return TestResult(t, float(min(1.0, p)), "welch-t")


def bootstrap_ci(
    columns: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    num_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over paired units.

    The same resampled unit indices are applied to every column, so paired measurements
    (two runs scoring the same chunks) keep their pairing.

    Args:
        columns: equal-length 1-D arrays, one value per unit.
        statistic: maps resampled columns, each [num_resamples, n], to [num_resamples]
            values (reduce over the last axis).
        num_resamples: bootstrap resamples; seeded, so the interval is reproducible.
        confidence: coverage of the two-sided interval.

    Returns:
        (low, high).
    """
    n = len(columns[0])
    if n == 0 or any(len(c) != n for c in columns):
        raise ValueError("bootstrap needs non-empty columns of equal length")
    idx = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))  # [B, n]
    values = np.asarray(statistic(*(np.asarray(c)[idx] for c in columns)), dtype=np.float64)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
