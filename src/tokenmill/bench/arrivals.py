"""Open-loop arrival times: a gamma renewal process (Poisson when burstiness is 1).

Gaps are i.i.d. Gamma(shape=burstiness, scale=1/(rate*burstiness)): the mean gap is always
1/rate, and the squared coefficient of variation is 1/burstiness, so burstiness < 1 gives
clumps of requests and burstiness > 1 smoother, more regular traffic. This is vLLM's
parameterization. Unlike vLLM we do not rescale the gaps so that N requests span exactly
N/rate seconds: that rescaling makes the gaps dependent and the process no longer Poisson.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def iter_arrival_offsets(
    request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> Iterator[float]:
    """Endless send times, seconds after the start of the run.

    Args:
        request_rate: mean requests per second; inf sends everything at time 0.
        burstiness: gamma shape (> 0); 1.0 is a Poisson process; inf is a fixed interval.
        seed: the arrival process has its own generator so workloads do not shift it.

    Returns:
        An iterator of non-decreasing offsets; the first request goes out after one gap
        (as in vLLM: no request at exactly t=0 unless the rate is infinite).
    """
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        while True:
            yield 0.0
    rng = np.random.default_rng([seed, 7])
    t = 0.0
    while True:
        if math.isinf(burstiness):
            gaps = np.full(256, 1.0 / request_rate)
        else:
            gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=256)
        for gap in gaps:
            t += float(gap)
            yield t


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """The first n offsets of iter_arrival_offsets, as an array (for tests and plots)."""
    it = iter_arrival_offsets(request_rate, burstiness, seed)
    return np.fromiter((next(it) for _ in range(n)), dtype=np.float64, count=n)
