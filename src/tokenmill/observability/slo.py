"""The service-level objectives: one definition that the Prometheus rules (burn-rate alerts)
and the Grafana dashboards (SLO tiles) are generated from.

A latency SLO reads a server histogram: the share of requests (or tokens) at or under a
bucket bound over a window is the SLI; the error budget is 1 - objective. Thresholds must be
bucket bounds of the histogram, or the SLI cannot be computed exactly from Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.server.metrics import ITL_BUCKETS, TTFT_BUCKETS


@dataclass(frozen=True)
class LatencySLO:
    name: str  # short name used in rule and panel names: "ttft", "itl"
    title: str  # for people: "Time to first token"
    histogram: str  # the histogram's metric name, without _bucket/_count
    threshold_s: float  # a bucket bound of `histogram`
    objective: float  # share of observations at or under threshold_s, e.g. 0.99
    buckets: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.threshold_s not in self.buckets:
            raise ValueError(f"{self.name} SLO threshold {self.threshold_s} s is not a bucket bound of "
                             f"{self.histogram} (bounds: {', '.join(map(str, self.buckets))})")
        if not 0.0 < self.objective < 1.0:
            raise ValueError(f"{self.name} SLO objective must be in (0, 1), not {self.objective}")

    @property
    def error_budget(self) -> float:
        return 1.0 - self.objective

    @property
    def le(self) -> str:
        """The bucket's `le` label as Prometheus exposes it ("1.0", "0.2")."""
        return repr(float(self.threshold_s))


# Defaults for interactive serving of small models on CPU; operators pass their own to the
# rule and dashboard generators.
TTFT_SLO = LatencySLO("ttft", "Time to first token", "tokenmill:time_to_first_token_seconds",
                      threshold_s=1.0, objective=0.99, buckets=tuple(TTFT_BUCKETS))
ITL_SLO = LatencySLO("itl", "Inter-token latency", "tokenmill:inter_token_latency_seconds",
                     threshold_s=0.2, objective=0.99, buckets=tuple(ITL_BUCKETS))
SLOS = (TTFT_SLO, ITL_SLO)
