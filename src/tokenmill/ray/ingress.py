"""The HTTP ingress deployment: reads each request, forwards it to an engine replica through
a Serve handle (routed by request_router.py) and relays the replica's answer.

Failures: a call that fails before the replica's first body byte reached the client (the
replica died, was unreachable, or was being replaced) is retried on another replica, with
backoff, `NUM_RETRIES` times; the client never sees it. Once bytes have gone out the
response cannot be restarted: a stream then ends with an OpenAI-style error event and
`data: [DONE]`, so clients stop cleanly instead of hanging. A client that leaves cancels the
call, which reaches the replica's app as a disconnect (the engine aborts the request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from ray import exceptions as ray_exceptions
from ray import serve
from ray.serve import exceptions as serve_exceptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tokenmill.gateway.accounting import routing_key
from tokenmill.gateway.asgi import ClientGone, read_body
from tokenmill.ray.asgi_call import HTTPCall, Message
from tokenmill.ray.config import RayAppConfig
from tokenmill.ray.replica_metrics import ReplicaDirectoryClient
from tokenmill.server.errors import RETRY_AFTER_S, APIError, error_body, sse_error_events
from tokenmill.server.streaming import wait_for_disconnect

logger = logging.getLogger("tokenmill.ray")

# A replica that is gone or going: the request had not run there, or ran without output.
RETRYABLE = (ray_exceptions.RayActorError, ray_exceptions.WorkerCrashedError, ray_exceptions.NodeDiedError,
             serve_exceptions.ReplicaUnavailableError)
NUM_RETRIES = 3
BACKOFF_S = 0.1
PROMPT_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is chat
SESSION_HEADER = "x-session-id"  # as the gateway's default affinity header


class Ingress:
    def __init__(self, engine, config: RayAppConfig) -> None:
        self._engine = engine.options(stream=True, method_name="handle")
        self._max_body_bytes = config.max_request_body_bytes
        self._max_routing_chars = config.routing.block_chars * config.routing.max_blocks  # all the policy reads
        self._directory = ReplicaDirectoryClient(serve.get_replica_context().app_name)
        self._session: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        self._retries = Counter("tokenmill:ray_ingress_retries", "Calls retried on another replica, by error.",
                                ["reason"], registry=self.registry)
        self._stream_errors = Counter("tokenmill:ray_ingress_stream_errors",
                                      "Responses cut short because their replica failed mid-stream.",
                                      registry=self.registry)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/metrics":
            self._session = self._session or aiohttp.ClientSession()
            return Response(await self._directory.federate(self._session, self.registry),
                            media_type=CONTENT_TYPE_LATEST)
        if request.method == "GET" and path == "/health":
            # Answered here: a probe must not count as load (autoscaling) nor wake a replica
            # scaled to zero. Serve restarts engine replicas whose check_health fails.
            return Response(status_code=200)
        try:
            body = await read_body(request.receive, self._max_body_bytes)
        except ClientGone:
            return Response(status_code=499)
        except APIError as e:  # 413
            return e.response()
        key = _routing_key(request, path, body)[: self._max_routing_chars]
        call = HTTPCall(request.method, path, request.scope.get("query_string", b""),
                        tuple(request.scope["headers"]), body, request.scope.get("client"), key)
        return await self._forward(call)

    async def _forward(self, call: HTTPCall) -> Response:
        for attempt in range(NUM_RETRIES + 1):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            stream = self._engine.remote(call)
            try:
                head = await _until_first_body(stream)
            except RETRYABLE as e:
                stream.cancel()
                self._retries.labels(type(e).__name__).inc()
                logger.warning("%s %s: replica failed before answering (%s); attempt %d of %d", call.method,
                               call.path, type(e).__name__, attempt + 1, NUM_RETRIES + 1)
                continue
            except serve_exceptions.BackPressureError:
                stream.cancel()
                return _error(503, "Every replica's queue is full; retry later.", "backpressure")
            except Exception:
                stream.cancel()
                logger.exception("%s %s failed", call.method, call.path)
                return _error(500, "The engine replica failed to answer.", "internal_error")
            except BaseException:  # cancelled: the client left
                stream.cancel()
                raise
            return RelayResponse(head, stream, self._stream_errors)
        return _error(503, f"No engine replica could take the request after {NUM_RETRIES + 1} attempts.",
                      "no_replica_available")


def _routing_key(request: Request, path: str, body: bytes) -> str:
    chat = PROMPT_ROUTES.get(path.rstrip("/"))
    if request.method != "POST" or chat is None:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""  # the replica answers the 400
    return routing_key(parsed, chat, request.headers.get(SESSION_HEADER)) if isinstance(parsed, dict) else ""


def _error(status: int, message: str, code: str) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(message, "server_error", code=code), status_code=status, headers=headers)


def _has_body(batch: list[Message]) -> bool:
    return any(m["type"] == "http.response.body" and (m.get("body") or not m.get("more_body")) for m in batch)


async def _until_first_body(stream) -> list[Message]:
    """The replica's messages up to and including its first batch with body bytes (or its
    last part): nothing has reached the client yet, so a failure here can be retried."""
    head: list[Message] = []
    async for batch in stream:
        head.extend(batch)
        if _has_body(batch):
            return head
    return head


class RelayResponse(Response):
    """The replica's response, relayed message by message as it arrives."""

    def __init__(self, head: list[Message], stream: Any, stream_errors: Counter) -> None:
        super().__init__()
        self._stream, self._stream_errors = stream, stream_errors
        start = head[0] if head and head[0]["type"] == "http.response.start" else {}
        headers = start.get("headers", ())
        self._is_sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
        if start:
            # Serve's proxy adds x-request-id itself (the same id: it passes the client's on, or
            # its own, which the replica's app then uses); once is enough.
            head = [{**start, "headers": [(k, v) for k, v in headers if k.lower() != b"x-request-id"]}, *head[1:]]
        self._head = head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        relay = asyncio.ensure_future(self._relay(send))
        try:
            await asyncio.wait({watcher, relay}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not relay.done():
                relay.cancel()
            if not relay.done() or relay.cancelled() or relay.exception() is not None:
                self._stream.cancel()  # the client left, or the relay broke: the replica stops
        if relay.done() and not relay.cancelled():
            relay.result()

    async def _relay(self, send: Send) -> None:
        for message in self._head:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                return
        try:
            async for batch in self._stream:
                for message in batch:
                    await send(message)
                    if message["type"] == "http.response.body" and not message.get("more_body"):
                        return
        except Exception as e:  # the replica (or the way to it) failed mid-response
            self._stream_errors.inc()
            logger.warning("replica failed mid-response: %r", e)
        tail = sse_error_events("The replica serving this stream failed; the output is incomplete.",
                                "replica_stream_error") if self._is_sse else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})

