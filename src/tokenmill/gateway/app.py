"""The gateway as one ASGI app: wiring and the order of checks on the hot path.

POST /v1/completions | /v1/chat/completions:
    read body -> key (401/403) -> model known (404) -> worst case -> limits and budget,
    atomically (429) -> replica (retries before the first byte) -> relay -> settle the real
    usage -> metrics and one access-log line.
Other /v1/* requests are passed through to a replica (key checked, not metered).
GET /v1/models (the replicas' models the key may use), /health, /metrics; /key/* admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import time
import uuid

import aiohttp
from redis.exceptions import RedisError

from tokenmill.gateway import admin
from tokenmill.gateway.accounting import Estimate, Usage, estimate, routing_text, upstream_body
from tokenmill.gateway.asgi import (
    ClientGone,
    header,
    parse_json,
    read_body,
    send_bytes,
    send_error,
    send_json,
)
from tokenmill.gateway.backends import BackendPool
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.keycache import KeyCache
from tokenmill.gateway.keys import KeyRecord, split_key
from tokenmill.gateway.ledger import SpendLedger
from tokenmill.gateway.limits import Reservation
from tokenmill.gateway.memory_limits import MemoryLimiter
from tokenmill.gateway.metering import rate_limit_error, rate_limit_headers, reservation_for
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.proxy import Call, Forwarder, upstream_headers
from tokenmill.gateway.routing import Router
from tokenmill.gateway.store import KeyStore, StoreError, redact
from tokenmill.server.errors import APIError, unavailable

logger = logging.getLogger("tokenmill.gateway")
access_logger = logging.getLogger("tokenmill.gateway.access")

COMPLETION_PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is chat
STATUS_CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
_SAFE_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def _request_id(scope) -> str:
    given = header(scope, b"x-request-id")
    if given and len(given) <= 128 and set(given) <= _SAFE_ID_CHARS:
        return given
    return uuid.uuid4().hex


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
                    lambda *a: self._completion(*a, chat=chat), scope, receive, send, request_id)
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
                return await self._until_disconnect(self._passthrough, scope, receive, send, request_id)
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
            while (await receive())["type"] != "http.disconnect":
                pass
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
    async def _state(awaitable):
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
        record = await self._state(self.keys.get(parts[0])) if parts else None
        now = time.time()
        if record is None or not record.matches(parts[1], now):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        problem = record.problem(now)
        if problem:
            raise APIError(401, f"This API key {problem}.", code="invalid_api_key")
        return record

    async def _completion(self, scope, body_bytes: bytes, send, request_id: str, *, chat: bool) -> None:
        t0 = time.perf_counter()
        key: KeyRecord | None = None
        model: str | None = None
        call: Call | None = None
        res: Reservation | None = None
        est: Estimate | None = None
        status, limited = 0, None
        try:
            key = await self.authenticate(scope)
            body = parse_json(body_bytes)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise APIError(400, "'model' is required.", param="model")
            if key is not None and not key.allows_model(model):
                raise APIError(403, f"This API key may not use the model '{model}'.", param="model",
                               code="model_not_allowed")
            if not self.pool.serves(model):
                raise APIError(404, f"The model '{model}' does not exist or no backend serves it.",
                               param="model", code="model_not_found")
            policy = self.config.policy(model)
            est = estimate(body, chat, policy.default_max_tokens)
            stream = body.get("stream") is True
            payload, drop_usage = upstream_body(body, body_bytes, est, stream)
            res = reservation_for(next(self._reservation_ids), key, model, policy, est, time.time())
            decision = await self._state(self.limiter.admit(res)) if res.scopes or res.budget else None
            if decision is not None and not decision.admitted:
                limited = decision.limit
                res = None
                raise rate_limit_error(decision, model)
            client_headers = {"x-request-id": request_id, **rate_limit_headers(decision)}
            call = Call(request_id, scope["path"], payload, model, stream, routing_text(body, chat),
                        upstream_headers(scope, request_id), client_headers, drop_usage, t0=t0)
            affinity = header(scope, self.config.affinity_header.encode()) or body.get("user")
            await self.forwarder.forward(call, send, affinity if isinstance(affinity, str) else None)
            status = call.status
        except APIError as e:
            status = e.status
            if call is None or call.first_sent_at is None:
                await send_error(send, e, {"x-request-id": request_id})
        except asyncio.CancelledError:
            status = STATUS_CLIENT_CLOSED
        finally:
            usage = self._usage_of(call, est, status)
            # Metrics label only models a replica serves: made-up names must not grow the series.
            served = model if model and self.pool.serves(model) else ""
            self._record(request_id, key, served, call, status, limited, usage, t0)
            if res is not None:
                # Shielded: a settlement must happen even when the client left mid-request.
                await asyncio.shield(self._settle(res, key, model, usage))

    @staticmethod
    def _usage_of(call: Call | None, est: Estimate | None, status: int) -> Usage:
        """What to charge: the replica's `usage`; after a disconnect mid-stream, the prompt's
        estimate and the chunks streamed; the worst case for a 200 without `usage`; nothing
        when nothing reached the client."""
        if call is None or call.first_sent_at is None or est is None:
            return Usage(0, 0)
        if call.usage is not None:
            return call.usage
        if call.streamed_chunks:
            return Usage(est.prompt_tokens, call.streamed_chunks)
        return Usage(est.prompt_tokens, est.completion_tokens) if status == 200 else Usage(0, 0)

    async def _settle(self, res: Reservation, key: KeyRecord | None, model: str, usage: Usage) -> None:
        usd = self.config.policy(model).cost_usd(usage.prompt_tokens, usage.completion_tokens)
        if key is not None:
            self.ledger.add(key.key_id, usage.total, usd)  # first: spend is never lost
        state = None
        if res.scopes or res.budget:
            try:
                state = await self.limiter.settle(res, usage.total, usd)
            except Exception as e:  # noqa: BLE001 - its slot and reservation expire with their lease
                logger.error("could not settle request %s in the limiter: %s", res.request_id, e)
        if key is None:
            return
        if state is not None:
            if state.remaining_usd is not None:
                self.metrics.remaining_usd.labels(key.label).set(state.remaining_usd)
            if state.remaining_tokens is not None:
                self.metrics.remaining_tokens.labels(key.label).set(state.remaining_tokens)
        if usd:
            self.metrics.spend.labels(key.label, model).inc(usd)

    def _record(self, request_id, key, model, call, status, limited, usage: Usage, t0) -> None:
        label, backend, model = key.label if key else "", call.backend if call else "", model or ""
        m = self.metrics
        m.child(m.requests, label, model, backend, str(status)).inc()
        if limited:
            m.child(m.limited, label, model, limited).inc()
        if usage.total:
            m.child(m.tokens, label, model, "prompt").inc(usage.prompt_tokens)
            m.child(m.tokens, label, model, "completion").inc(usage.completion_tokens)
        total_s = time.perf_counter() - t0
        added = call.added_s if call else None
        if added is not None:
            m.added_latency.observe(added)
        m.child(m.request_latency, model).observe(total_s)
        if self.config.access_log:
            access_logger.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": request_id, "key": label, "model": model or None,
                "backend": backend, "status": status, "stream": bool(call and call.stream),
                "latency_ms": round(total_s * 1e3, 2),
                "added_ms": None if added is None else round(added * 1e3, 3),
                "retries": call.retries if call else 0, "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens, "limited": limited,
                "error": call.error if call and call.error else None}))

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

    async def _passthrough(self, scope, body: bytes, send, request_id: str) -> None:
        """Any other POST /v1 route (embeddings, tokenize, ...): the key and its allowed models
        checked, the body forwarded as it came to the least-loaded replica serving its model."""
        status, key, call, model = 0, None, None, None
        t0 = time.perf_counter()
        try:
            if scope["method"] != "POST":
                raise APIError(405, f"The gateway passes through POST requests only ({scope['method']} {scope['path']}).")
            key = await self.authenticate(scope)
            try:
                model = json.loads(body).get("model") if body else None
            except (ValueError, AttributeError):
                model = None
            if key is not None and isinstance(model, str) and not key.allows_model(model):
                raise APIError(403, f"This API key may not use the model '{model}'.", param="model",
                               code="model_not_allowed")
            path = scope["path"] + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
            call = Call(request_id, path, body, model if isinstance(model, str) else None, False, "",
                        upstream_headers(scope, request_id), {"x-request-id": request_id}, t0=t0)
            await self.forwarder.forward(call, send)
            status = call.status
        except APIError as e:
            status = e.status
            await send_error(send, e, {"x-request-id": request_id})
        except asyncio.CancelledError:
            status = STATUS_CLIENT_CLOSED
        finally:
            served = model if isinstance(model, str) and self.pool.serves(model) else ""
            self._record(request_id, key, served, call, status, None, Usage(0, 0), t0)


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
