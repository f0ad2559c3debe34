"""The gateway's Prometheus metrics (tokenmill:gateway_* , the engine's naming style).

`key` labels carry the key's alias (or id when it has none), never the key itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenmill.gateway.backends import CLOSED, HALF_OPEN, OPEN, BackendPool

_P = "tokenmill:gateway_"
# The gateway's own time is sub-millisecond to a few ms; the upstream's is the engine's.
ADDED_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
                           0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_CIRCUIT = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class GatewayMetrics:
    def __init__(self, pool: BackendPool) -> None:
        self.registry = r = CollectorRegistry()
        self._children: dict = {}
        self._pool = pool
        self.requests = Counter(_P + "requests", "Requests by key, model, backend and HTTP status.",
                                ["key", "model", "backend", "status"], registry=r)
        self.added_latency = Histogram(
            _P + "added_latency_seconds",
            "Time a request spends in the gateway itself: before it is sent upstream plus between the "
            "upstream's response (first chunk for streams) and the client's.",
            buckets=ADDED_LATENCY_BUCKETS_S, registry=r)
        self.request_latency = Histogram(_P + "request_latency_seconds", "End-to-end request time.",
                                         ["model"], registry=r)
        self.tokens = Counter(_P + "tokens", "Tokens settled, by key, model and kind (prompt | completion).",
                              ["key", "model", "kind"], registry=r)
        self.spend = Counter(_P + "spend_usd", "Dollars spent, by key and model (model prices).",
                             ["key", "model"], registry=r)
        self.remaining_usd = Gauge(_P + "remaining_budget_usd", "Dollar budget left this period.",
                                   ["key"], registry=r)
        self.remaining_tokens = Gauge(_P + "remaining_budget_tokens", "Token budget left this period.",
                                      ["key"], registry=r)
        self.limited = Counter(_P + "rate_limited_requests",
                               "Requests refused with 429, by key, model and limit "
                               "(requests | tokens | parallel | budget_tokens | budget_usd).",
                               ["key", "model", "limit"], registry=r)
        self.retries = Counter(_P + "retries", "Requests tried again on another backend, by the backend "
                               "that failed and why.", ["backend", "reason"], registry=r)
        self.healthy = Gauge(_P + "backend_healthy", "1 if the backend's last health check passed.",
                             ["backend"], registry=r)
        self.outstanding = Gauge(_P + "backend_outstanding_requests", "Requests in flight to the backend.",
                                 ["backend"], registry=r)
        self.circuit = Gauge(_P + "backend_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                             ["backend"], registry=r)

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, remembered: the lookup is a dict hit on the hot path
        (the client's labels() validates and locks on every call)."""
        found = self._children.get((metric, labels))
        if found is None:
            found = self._children[(metric, labels)] = metric.labels(*labels)
        return found

    def exposition(self) -> bytes:
        for b in self._pool.backends:  # gauges of state owned by the pool, read at scrape time
            self.healthy.labels(b.name).set(1 if b.healthy else 0)
            self.outstanding.labels(b.name).set(b.outstanding)
            self.circuit.labels(b.name).set(_CIRCUIT[b.state])
        return generate_latest(self.registry)
