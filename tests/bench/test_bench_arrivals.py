"""Open-loop arrival processes: mean rate and burstiness within statistical bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.bench.arrivals import arrival_offsets

N = 20_000


def gaps(rate: float, burstiness: float, seed: int = 0) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], arrival_offsets(N, rate, burstiness, seed)]))


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_mean_rate_and_exponential_gaps(rate):
    g = gaps(rate, 1.0)
    # The mean of N exponential gaps has std (1/rate)/sqrt(N): allow 4 sigma.
    assert abs(g.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(N)
    cv2 = g.var() / g.mean() ** 2
    assert abs(cv2 - 1.0) < 0.06  # squared coefficient of variation of an exponential is 1
    # Memorylessness check: P(gap > 1/rate) = e^-1.
    assert abs(np.mean(g > 1 / rate) - math.exp(-1)) < 4 * math.sqrt(0.25 / N)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 4.0])
def test_gamma_burstiness_sets_cv_not_rate(burstiness):
    rate = 10.0
    g = gaps(rate, burstiness, seed=3)
    cv2_expected = 1.0 / burstiness
    # Gamma(k) gaps: std of the mean is sqrt(cv2/N)/rate.
    assert abs(g.mean() - 1 / rate) < 4 * math.sqrt(cv2_expected / N) / rate
    assert abs(g.var() / g.mean() ** 2 - cv2_expected) < 0.1 * cv2_expected


def test_infinite_rate_and_infinite_burstiness():
    assert np.all(arrival_offsets(10, float("inf")) == 0.0)
    assert np.allclose(np.diff(arrival_offsets(10, 5.0, float("inf"))), 0.2)


def test_seeded_and_monotonic():
    a, b = arrival_offsets(500, 3.0, 1.0, seed=9), arrival_offsets(500, 3.0, 1.0, seed=9)
    assert np.array_equal(a, b) and np.all(np.diff(a) >= 0)
    assert not np.array_equal(a, arrival_offsets(500, 3.0, 1.0, seed=10))


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        arrival_offsets(1, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(1, 1.0, burstiness=0.0)
