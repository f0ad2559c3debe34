"""Sending one request upstream: choose a replica, retry before the first byte, relay after.

A request may go to another replica after a connection error, a 429 or a 503, or the
replica dying before it sent anything (a non-streaming request that was being generated on
it included): the client has seen nothing yet. Once the first byte is on its way to the
client the replica is committed; a failure after that ends the stream with an error event.
Streams are relayed event by event as they arrive; nothing is buffered beyond one event.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

from tokenmill.gateway.accounting import SseRelay, Usage, usage_of
from tokenmill.gateway.backends import HALF_OPEN, Backend, BackendPool
from tokenmill.gateway.config import RetryConfig
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.routing import Router
from tokenmill.server.errors import APIError, sse_error_events

RETRY_STATUSES = (429, 503)
# Response headers not passed on: hop-by-hop ones, and those the gateway's server writes itself.
# (x-request-id: the gateway sets its own, the same id.)
_NOT_RELAYED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
                          "proxy-authenticate", "trailer", "upgrade", "x-request-id"})
# Client headers passed upstream (request ids and trace context join logs across hops).
FORWARDED_HEADERS = (b"traceparent", b"tracestate", b"x-session-id")


@dataclass
class Call:
    """One proxied request: what to send, and what happened (for metrics and the access log)."""

    request_id: str
    path: str  # e.g. /v1/chat/completions
    payload: bytes  # the body sent upstream
    model: str | None
    stream: bool
    routing_text: str  # what the routing policy keys on (accounting.routing_key)
    upstream_headers: dict[str, str]
    client_headers: dict[str, str]  # sent to the client with the response (rate limits)
    drop_usage_chunk: bool = False
    t0: float = field(default_factory=time.perf_counter)
    backend: str = ""
    status: int = 0
    retries: int = 0
    upstream_wait_s: float = 0.0  # waiting on replicas, up to the first byte (not the gateway's time)
    first_sent_at: float | None = None  # when the first byte went to the client
    streamed_chunks: int = 0
    usage: Usage | None = None
    error: str = ""

    @property
    def added_s(self) -> float | None:
        if self.first_sent_at is None:
            return None
        return max(0.0, self.first_sent_at - self.t0 - self.upstream_wait_s)


@dataclass(frozen=True)
class _Failure:
    backend: str
    reason: str  # connect | read | 429 | 503
    detail: str
    response: tuple[int, bytes, dict[str, str]] | None = None  # a 429/503 to relay if nothing better


def upstream_headers(scope, request_id: str) -> dict[str, str]:
    """The headers sent to the replica: the request id, and the client's trace context."""
    out = {"content-type": "application/json", "x-request-id": request_id}
    for name, value in scope["headers"]:
        if name in FORWARDED_HEADERS or name == b"content-type":
            out[name.decode()] = value.decode("latin-1")
    return out


def _relayed(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The replica's response headers the client should see (lower-cased names)."""
    return {k.lower(): v for k, v in resp.headers.items() if k.lower() not in _NOT_RELAYED}


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Forwarder:
    def __init__(self, pool: BackendPool, router: Router, retry: RetryConfig, metrics: GatewayMetrics,
                 session: aiohttp.ClientSession) -> None:
        self.pool, self.router, self.retry, self.metrics, self.session = pool, router, retry, metrics, session
        # The total bounds every request (streams included), so Redis leases outlive them all.
        self._timeout = aiohttp.ClientTimeout(total=retry.request_timeout_s, sock_connect=retry.connect_timeout_s)

    async def forward(self, call: Call, send) -> None:
        """Relay the response of some replica to the client, or raise an APIError."""
        tried: set[str] = set()
        failure: _Failure | None = None
        for attempt in range(self.retry.num_retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            # Another replica if there is one; else the same one again, after the backoff.
            candidates = self.pool.candidates(call.model, exclude=tried) or self.pool.candidates(call.model)
            if not candidates:
                break
            if attempt:
                call.retries += 1
                self.metrics.retries.labels(failure.backend, failure.reason).inc()
            name = self.router.choose(call.routing_text, self.pool.as_candidates(candidates))
            backend = self.pool.get(name)
            tried.add(name)
            failure = await self._attempt(backend, call, send)
            if failure is None:
                return
            call.error = f"{name}: {failure.detail}"
        if failure is not None and failure.response is not None:
            status, body, headers = failure.response
            call.status = status
            await self._send_whole(call, send, status, body, headers)
            return
        if failure is None:
            raise APIError(503, "No healthy backend serves this model right now; retry shortly.",
                           type="server_error", code="no_healthy_backend", headers={"Retry-After": "1"})
        raise APIError(502, f"Every backend tried failed before answering (last: {call.error}).",
                       type="server_error", code="upstream_unavailable", headers={"Retry-After": "1"})

    async def _attempt(self, backend: Backend, call: Call, send) -> _Failure | None:
        probing = backend.state == HALF_OPEN
        backend.probing |= probing
        backend.outstanding += 1
        call.backend = backend.name
        resp: aiohttp.ClientResponse | None = None
        completed = False
        started = time.perf_counter()
        headers = call.upstream_headers
        if backend.config.api_key:
            headers = {**headers, "authorization": f"Bearer {backend.config.api_key}"}
        try:
            try:
                # No redirects: a replica's redirect must not re-send the request unmetered.
                resp = await self.session.post(backend.name + call.path, data=call.payload, headers=headers,
                                               timeout=self._timeout, allow_redirects=False)
                if resp.status in RETRY_STATUSES:
                    body = await resp.read()
                    # Overloaded or draining: back-pressure, not a fault (it must not open circuits).
                    return _Failure(backend.name, str(resp.status), f"answered {resp.status}",
                                    (resp.status, body, _relayed(resp)))
                if call.stream and resp.status == 200:
                    first = await resp.content.readany()
                    if not first:
                        raise aiohttp.ServerDisconnectedError("closed before the first event")
                else:
                    first = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                backend.on_failure(time.monotonic(), _describe(e), self.pool.health.max_fails)
                return _Failure(backend.name, "read" if resp is not None else "connect", _describe(e))
            finally:
                call.upstream_wait_s += time.perf_counter() - started
            # Committed to this replica: the client gets this answer, whatever comes next.
            if resp.status >= 500:
                backend.on_failure(time.monotonic(), f"answered {resp.status}", self.pool.health.max_fails)
            else:
                backend.on_success()
            call.status = resp.status
            if call.stream and resp.status == 200:
                await self._relay_stream(backend, call, resp, first, send)
            else:
                if resp.status == 200:
                    try:
                        call.usage = usage_of(json.loads(first))
                    except ValueError:
                        pass
                await self._send_whole(call, send, resp.status, first, _relayed(resp))
            completed = True
            return None
        finally:
            backend.outstanding -= 1
            if probing:
                backend.probing = False
            if resp is not None:
                if completed and resp.content.at_eof():
                    resp.release()  # back to the pool for the next request
                else:
                    resp.close()  # drops the connection: the replica sees the client leave

    async def _send_whole(self, call: Call, send, status: int, body: bytes, headers: dict[str, str]) -> None:
        call.first_sent_at = time.perf_counter()
        await send({"type": "http.response.start", "status": status, "headers": _raw({**headers, **call.client_headers})})
        await send({"type": "http.response.body", "body": body})

    async def _relay_stream(self, backend: Backend, call: Call, resp: aiohttp.ClientResponse, first: bytes,
                            send) -> None:
        relay = SseRelay(call.drop_usage_chunk)
        headers = {"cache-control": "no-cache", **_relayed(resp), **call.client_headers}
        call.first_sent_at = time.perf_counter()
        await send({"type": "http.response.start", "status": 200, "headers": _raw(headers)})
        tail = b""
        try:
            data = relay.feed(first)
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            async for chunk in resp.content.iter_any():
                data = relay.feed(chunk)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            tail = relay.rest()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            # The replica died mid-stream: nothing can be retried, so end the stream cleanly.
            backend.on_failure(time.monotonic(), _describe(e), self.pool.health.max_fails)
            call.error = f"{backend.name}: {_describe(e)} after {relay.chunks} chunk(s)"
            call.status = 502
            tail = sse_error_events("The backend failed in the middle of the stream; the output is incomplete.",
                                    "upstream_stream_error")
        finally:
            call.usage, call.streamed_chunks = relay.usage, relay.chunks
        await send({"type": "http.response.body", "body": tail, "more_body": False})
