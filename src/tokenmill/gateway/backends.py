"""The replicas behind the gateway: their load, health and circuit breakers.

Health has two sources: an active check (GET /v1/models every `interval_s`, which also
tells which models each replica serves; a replica failing it gets no traffic until it
passes again) and the requests themselves (passive: a replica that fails `max_fails`
requests in a row, by connection errors or 5xx answers other than 503, is ejected: its
circuit opens). After `cooldown_s` the circuit is half-open and lets one probe request
through: success closes it, failure opens it again. 503s (overload, draining) and 429s are
back-pressure, retried elsewhere, never counted as faults.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from tokenmill.gateway.routing import Candidate

logger = logging.getLogger("tokenmill.gateway")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"


@dataclass(frozen=True)
class BackendConfig:
    url: str  # http://host:port (no /v1)
    weight: float = 1.0
    api_key: str | None = None  # sent to this backend as Bearer

    @staticmethod
    def parse(text: str) -> BackendConfig:
        """URL or URL=WEIGHT (command line)."""
        url, _, weight = text.partition("=")
        return BackendConfig(url, float(weight) if weight else 1.0)

    def __post_init__(self) -> None:
        url = self.url.rstrip("/").removesuffix("/v1")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend {self.url!r}: give its URL, e.g. http://10.0.0.5:8000")
        if not self.weight > 0:
            raise ValueError(f"backend {url}: weight must be > 0, not {self.weight}")
        object.__setattr__(self, "url", url)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0
    max_fails: int = 3  # consecutive failed requests that eject a replica
    cooldown_s: float = 10.0  # how long an ejected replica waits before a probe


@dataclass
class Backend:
    config: BackendConfig
    outstanding: int = 0
    healthy: bool = False  # last active check (False until the first one answers)
    models: frozenset[str] = frozenset()
    state: str = CLOSED
    fails: int = 0  # consecutive request failures
    opened_at: float = 0.0
    probing: bool = False  # a half-open probe is in flight
    last_error: str = field(default="")

    @property
    def name(self) -> str:
        return self.config.url

    def available(self, now: float, cooldown_s: float) -> bool:
        if not self.healthy:
            return False
        if self.state == OPEN and now - self.opened_at >= cooldown_s:
            self.state = HALF_OPEN
        return self.state == CLOSED or (self.state == HALF_OPEN and not self.probing)

    def on_success(self) -> None:
        self.fails, self.probing = 0, False
        if self.state != CLOSED:
            logger.info("backend %s: circuit closed", self.name)
        self.state = CLOSED

    def on_failure(self, now: float, reason: str, max_fails: int) -> None:
        self.fails += 1
        self.last_error = reason
        if self.state == HALF_OPEN or self.fails >= max_fails:
            if self.state != OPEN:
                logger.warning("backend %s: circuit open after %d failure(s): %s", self.name, self.fails, reason)
            self.state, self.opened_at, self.probing = OPEN, now, False


class BackendPool:
    """Owns every Backend; the active health checker runs in its task."""

    def __init__(self, configs: list[BackendConfig], health: HealthConfig) -> None:
        if not configs:
            raise ValueError("the gateway needs at least one --backend")
        self.backends = [Backend(c) for c in configs]
        self.health = health
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    def candidates(self, model: str | None, exclude: set[str] = frozenset()) -> list[Backend]:
        """Replicas that can take a request for `model` now."""
        now = time.monotonic()
        return [b for b in self.backends if b.name not in exclude and b.available(now, self.health.cooldown_s)
                and (model is None or not b.models or model in b.models)]

    @staticmethod
    def as_candidates(backends: list[Backend]) -> list[Candidate]:
        return [Candidate(b.name, b.outstanding, b.config.weight) for b in backends]

    def get(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    def models(self) -> list[str]:
        return sorted({m for b in self.backends if b.healthy for m in b.models})

    def serves(self, model: str) -> bool:
        return any(model in b.models for b in self.backends)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.backends))

    async def _check(self, backend: Backend) -> None:
        headers = {"Authorization": f"Bearer {backend.config.api_key}"} if backend.config.api_key else {}
        try:
            timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
            async with self._session.get(backend.name + "/v1/models", headers=headers, timeout=timeout) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET /v1/models answered {r.status}")
                data = await r.json(content_type=None)
            backend.models = frozenset(m["id"] for m in data.get("data", []))
            if not backend.healthy:
                logger.info("backend %s: healthy, serving %s", backend.name, ", ".join(sorted(backend.models)))
            backend.healthy = True  # (an open circuit still waits for its half-open probe)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy, and is logged
            if backend.healthy:
                logger.warning("backend %s: health check failed: %s", backend.name, e or type(e).__name__)
            backend.healthy = False
            backend.last_error = str(e) or type(e).__name__
