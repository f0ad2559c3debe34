"""The gateway as one ASGI app: wiring and the order of checks on the hot path.

POST /v1/completions | /v1/chat/completions:
    read body -> key (401/403) -> model known (404) -> worst case -> limits and budget,
    atomically (429) -> replica (retries before the first byte) -> relay -> settle the real
    usage -> metrics and one access-log line.
(completions.py). Other /v1/* requests are passed through to a replica (key and models
checked, not metered).
GET /v1/models (the replicas' models the key may use), /health, /metrics; /key/* admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
import uuid

import aiohttp
from redis.exceptions import RedisError

from tokenmill.gateway import admin
from tokenmill.gateway.asgi import (
    ClientGone,
    header,
    read_body,
    send_bytes,
    send_error,
    send_json,
)
from tokenmill.gateway.backends import BackendPool
from tokenmill.gateway.completions import completion, passthrough
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.keycache import KeyCache
from tokenmill.gateway.keys import KeyRecord, split_key
from tokenmill.gateway.ledger import SpendLedger
from tokenmill.gateway.memory_limits import MemoryLimiter
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.proxy import Forwarder
from tokenmill.gateway.routing import Router
from tokenmill.gateway.store import KeyStore, StoreError, redact
from tokenmill.server.errors import APIError, unavailable
from tokenmill.server.middleware import SAFE_REQUEST_ID
from tokenmill.server.streaming import wait_for_disconnect

logger = logging.getLogger("tokenmill.gateway")

COMPLETION_PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is chat
def _request_id(scope) -> str:
    """The client's X-Request-Id if tame (the server's rule), else a new one."""
    given = header(scope, b"x-request-id")
    return given if given and SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex


class Gateway:
    """Owns the gateway's parts; `self` is the ASGI app."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.store = KeyStore(config.db)
        self.keys = KeyCache(self.store, config.key_cache_ttl_s)
        self.pool = BackendPool(list(config.backends), config.health)
        self.router = Router(config.routing)
        self.metrics = GatewayMetrics(self.pool)
        self.limiter = None
        self.ledger = SpendLedger(self.store)
        self.session: aiohttp.ClientSession | None = None
        self.forwarder: Forwarder | None = None
        # Unique across gateways sharing a Redis: a random prefix per process, then a counter.
        self._reservation_ids = (f"{uuid.uuid4().hex[:12]}.{i}" for i in itertools.count())

    def new_reservation_id(self) -> str:
        return next(self._reservation_ids)

    async def startup(self) -> None:
        if self.config.redis_url:
            from tokenmill.gateway.redis_limits import RedisLimiter

            # Leases outlive the longest request (the upstream call's total timeout) by a minute.
            self.limiter = RedisLimiter(self.config.redis_url, self.ledger.load_spend,
                                        lease_s=self.config.retry.request_timeout_s + 60)
            try:
                await self.limiter.ping()
            except Exception as e:
                raise RuntimeError(f"cannot reach Redis at {redact(self.config.redis_url)}: {e}") from e
        else:
            self.limiter = MemoryLimiter(self.ledger.load_spend)
        # No connection limit: the replicas' own admission control decides, not a client pool.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.forwarder = Forwarder(self.pool, self.router, self.config.retry, self.metrics, self.session)
        await self.pool.start(self.session)
        self.ledger.start()
        # What exists now lives as long as the process: keep the collector's full passes off it
        # (they are the pauses in a proxy's p99).
        gc.collect()
        gc.freeze()
        logger.info("gateway: %d backend(s), %d healthy; routing %s; limits %s; keys in %s",
                    len(self.pool.backends), sum(b.healthy for b in self.pool.backends),
                    self.config.routing.policy, "in Redis" if self.config.redis_url else "in process",
                    redact(self.store.url))

    async def shutdown(self) -> None:
        await self.pool.stop()
        await self.ledger.stop()
        if self.session:
            await self.session.close()
        if self.limiter:
            await self.limiter.close()
        self.store.close()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        # A trailing slash changes nothing (and must not slip a completion past the metering).
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        if path != scope["path"]:
            scope = {**scope, "path": path}
        request_id = _request_id(scope)
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = True
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if path in COMPLETION_PATHS and method == "POST":
                chat = COMPLETION_PATHS[path]
                return await self._until_disconnect(
                    lambda *a: completion(self, *a, chat=chat), scope, receive, tracked_send, request_id)
            if path == "/health":
                healthy = sum(b.healthy for b in self.pool.backends)
                return await send_json(tracked_send, 200 if healthy else 503,
                                       {"healthy_backends": healthy, "backends": len(self.pool.backends)})
            if path == "/metrics":
                return await send_bytes(tracked_send, 200, self.metrics.exposition(),
                                        content_type=b"text/plain; version=0.0.4")
            if path.startswith("/v1/models") and method == "GET":
                return await self._models(scope, tracked_send, path.removeprefix("/v1/models").lstrip("/"))
            if path.startswith("/key/"):
                return await admin.handle(self, scope, receive, tracked_send)
            if path.startswith("/v1/"):
                return await self._until_disconnect(
                    lambda *a: passthrough(self, *a), scope, receive, tracked_send, request_id)
            raise APIError(404, f"No route {method} {path} on this gateway.", code="not_found")
        except APIError as e:
            if not started:
                await send_error(tracked_send, e)
        except ClientGone:
            pass
        except Exception:  # noqa: BLE001 - an OpenAI-shaped 500, the traceback in the log
            logger.exception("request %s failed", request_id)
            if not started:
                await send_error(tracked_send, APIError(
                    500, f"Internal error in the gateway (request id {request_id}); see its log.", type="server_error"))

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    logger.error("gateway failed to start: %s", e)
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _until_disconnect(self, handler, scope, receive, send, request_id: str) -> None:
        """Read the body, then run a proxied request; if the client leaves before its response
        is complete, cancel it at once, which closes the upstream connection so the replica
        stops generating too. (The body is read first: ASGI lets one reader call receive().)
        The handler runs in this task (a task less per request); the watcher cancels it."""
        body = await read_body(receive, self.config.max_body_bytes)
        this = asyncio.current_task()
        finished = gone = False

        async def tracked_send(message) -> None:
            nonlocal finished
            finished = message["type"] == "http.response.body" and not message.get("more_body")
            await send(message)

        async def watch() -> None:
            nonlocal gone
            await wait_for_disconnect(receive)
            if not finished:
                gone = True
                this.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler(scope, body, tracked_send, request_id)
        except asyncio.CancelledError:
            if not gone:
                raise  # we are being cancelled ourselves (shutdown)
        finally:
            watcher.cancel()
            if gone and hasattr(this, "uncancel"):
                this.uncancel()  # that cancellation was ours, and is handled

    @staticmethod
    async def state(awaitable):
        """Await a call to the key database or Redis; their failure is a 503, not a crash."""
        try:
            return await awaitable
        except (StoreError, RedisError, OSError) as e:
            logger.error("gateway state unavailable: %s", e)
            raise unavailable("The gateway cannot reach its key or limit store right now; retry shortly.",
                              "state_store_unavailable") from e

    async def authenticate(self, scope) -> KeyRecord | None:
        """The caller's key record (None when auth is off), or 401."""
        if not self.config.require_auth:
            return None
        auth = header(scope, b"authorization") or ""
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key:
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        parts = split_key(key)
        record = await self.state(self.keys.get(parts[0])) if parts else None
        now = time.time()
        if record is None or not record.matches(parts[1], now):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        problem = record.problem(now)
        if problem:
            raise APIError(401, f"This API key {problem}.", code="invalid_api_key")
        return record

    async def _models(self, scope, send, model_id: str) -> None:
        """GET /v1/models (what the replicas serve and the key may use) or /v1/models/{id}."""
        key = await self.authenticate(scope)
        models = [m for m in self.pool.models() if key is None or key.allows_model(m)]
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": "tokenmill-gateway"} for m in models]
        if not model_id:
            return await send_json(send, 200, {"object": "list", "data": cards})
        card = next((c for c in cards if c["id"] == model_id), None)
        if card is None:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        await send_json(send, 200, card)

def build_gateway(config: GatewayConfig) -> Gateway:
    return Gateway(config)


@contextlib.asynccontextmanager
async def running(config: GatewayConfig):
    """The gateway started and stopped around a block (tests, embedding)."""
    gw = Gateway(config)
    await gw.startup()
    try:
        yield gw
    finally:
        await gw.shutdown()
