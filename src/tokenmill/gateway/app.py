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

from tokenmill.gateway import admin
from tokenmill.gateway.accounting import Estimate, Usage, estimate, routing_text
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
from tokenmill.gateway.limits import MemoryLimiter, Reservation
from tokenmill.gateway.metering import rate_limit_error, rate_limit_headers, reservation_for
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.proxy import FORWARDED_HEADERS, Call, Forwarder
from tokenmill.gateway.routing import Router
from tokenmill.gateway.store import KeyStore
from tokenmill.server.errors import APIError

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

            self.limiter = RedisLimiter(self.config.redis_url, lease_s=self.config.retry.request_timeout_s + 60)
            try:
                await self.limiter.ping()
            except Exception as e:
                raise RuntimeError(f"cannot reach Redis at {self.config.redis_url}: {e}") from e
        else:
            self.limiter = MemoryLimiter()
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
                    self.store.url if not self.store.url.startswith("postgres") else "PostgreSQL")

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
        path, method = scope["path"], scope["method"]
        try:
            if path in COMPLETION_PATHS and method == "POST":
                chat = COMPLETION_PATHS[path]
                return await self._until_disconnect(
                    lambda *a: self._completion(*a, chat=chat), scope, receive, send)
            if path == "/health":
                healthy = any(b.healthy for b in self.pool.backends)
                return await send_json(send, 200 if healthy else 503, {"healthy_backends": sum(
                    b.healthy for b in self.pool.backends), "backends": len(self.pool.backends)})
            if path == "/metrics":
                return await send_bytes(send, 200, self.metrics.exposition(), content_type=b"text/plain; version=0.0.4")
            if path == "/v1/models" and method == "GET":
                return await self._models(scope, send)
            if path.startswith("/key/"):
                return await admin.handle(self, scope, receive, send)
            if path.startswith("/v1/"):
                return await self._until_disconnect(self._passthrough, scope, receive, send)
            raise APIError(404, f"No route {method} {path} on this gateway.", code="not_found")
        except APIError as e:
            await send_error(send, e)
        except ClientGone:
            pass

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

    async def _until_disconnect(self, handler, scope, receive, send) -> None:
        """Run a proxied request; if the client leaves before its response is complete, cancel
        it at once, which closes the upstream connection so the replica stops generating too."""
        finished = False

        async def tracked_send(message) -> None:
            nonlocal finished
            finished = message["type"] == "http.response.body" and not message.get("more_body")
            await send(message)

        task = asyncio.ensure_future(handler(scope, receive, tracked_send))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled() or not watcher.done():
                raise  # we are being cancelled ourselves (shutdown)
        finally:
            watcher.cancel()

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
        record = await self.keys.get(parts[0]) if parts else None
        now = time.time()
        if record is None or not record.matches(parts[1], now):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        problem = record.problem(now)
        if problem:
            raise APIError(401, f"This API key {problem}.", code="invalid_api_key")
        return record

    async def _completion(self, scope, receive, send, *, chat: bool) -> None:
        request_id = _request_id(scope)
        t0 = time.perf_counter()
        key: KeyRecord | None = None
        model: str | None = None
        call: Call | None = None
        res: Reservation | None = None
        est: Estimate | None = None
        status, limited = 0, None
        try:
            body_bytes = await read_body(receive, self.config.max_body_bytes)
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
            payload, drop_usage = body_bytes, False
            if not est.max_tokens_given or stream:
                if not est.max_tokens_given:  # the reservation must bound what the replica may generate
                    body["max_tokens"] = policy.default_max_tokens
                if stream and not (body.get("stream_options") or {}).get("include_usage"):
                    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
                    drop_usage = True
                payload = json.dumps(body).encode()
            if key is not None:
                await self.ledger.ensure_seeded(self.limiter, key)
            res = reservation_for(next(self._reservation_ids), key, model, policy, est, time.time())
            decision = await self.limiter.admit(res) if res.scopes or res.budget else None
            if decision is not None and not decision.admitted:
                limited = decision.limit
                res = None
                raise rate_limit_error(decision, model)
            client_headers = {"x-request-id": request_id, **rate_limit_headers(decision)}
            upstream = {"content-type": "application/json", "x-request-id": request_id}
            for name in FORWARDED_HEADERS:
                value = header(scope, name)
                if value:
                    upstream[name.decode()] = value
            call = Call(request_id, scope["path"], payload, model, stream, routing_text(body, chat), upstream,
                        client_headers, drop_usage, t0=t0)
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
            self._record(request_id, key, model, call, status, limited, usage, t0)
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
        state = await self.limiter.settle(res, usage.total, usd) if res.scopes or res.budget else None
        if key is None:
            return
        self.ledger.add(key.key_id, res.budget.id if res.budget else None, usage.total, usd)
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

    async def _models(self, scope, send) -> None:
        key = await self.authenticate(scope)
        models = [m for m in self.pool.models() if key is None or key.allows_model(m)]
        await send_json(send, 200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "tokenmill-gateway"} for m in models]})

    async def _passthrough(self, scope, receive, send) -> None:
        """Any other /v1 endpoint: key checked, body forwarded as is to the least-loaded replica."""
        request_id = _request_id(scope)
        status = 0
        key = None
        call = None
        t0 = time.perf_counter()
        try:
            body = await read_body(receive, self.config.max_body_bytes)
            key = await self.authenticate(scope)
            path = scope["path"] + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
            upstream = {"content-type": header(scope, b"content-type") or "application/json",
                        "x-request-id": request_id}
            call = Call(request_id, path, body, None, False, "", upstream, {"x-request-id": request_id}, t0=t0)
            if scope["method"] != "POST":
                raise APIError(405, f"The gateway passes through POST requests only ({scope['method']} {path}).")
            await self.forwarder.forward(call, send)
            status = call.status
        except APIError as e:
            status = e.status
            await send_error(send, e, {"x-request-id": request_id})
        except asyncio.CancelledError:
            status = STATUS_CLIENT_CLOSED
        finally:
            self._record(request_id, key, None, call, status, None, Usage(0, 0), t0)


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
