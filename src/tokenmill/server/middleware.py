"""Pure ASGI middleware (not BaseHTTPMiddleware, which wraps `receive` and would hide the
client's disconnect from the handlers): request id, API key, draining, body size, request
accounting, clean 500s."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.drain import Drain
from tokenmill.server.errors import APIError, error_body, unavailable
from tokenmill.server.request_context import (
    RequestContext,
    bind_request,
    trace_headers_of,
    unbind_request,
)
from tokenmill.server.streaming import STATUS_CLIENT_CLOSED

logger = logging.getLogger("tokenmill.server")
# uvicorn writes its access line when a response starts, and skips it once the client is
# gone; the 499 line for a request whose client left is written here, in the same format.
access_logger = logging.getLogger("uvicorn.access")

# Paths that need the API key when one is set; probes and scrapes stay open, as in vLLM.
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# A client-supplied X-Request-Id is echoed into logs and headers only if it is this tame.
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Called once per HTTP request with (route template or "none", method, status).
OnResponse = Callable[[str, str, int], None]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def body_too_large(max_bytes: int, size: int | None = None) -> APIError:
    has = f"has {size} bytes" if size is not None else "is larger than that"
    return APIError(413, f"The request body {has}; this server takes at most {max_bytes} bytes "
                    "(--max-request-body-bytes).", code="request_too_large")


class RequestContextMiddleware:
    """For every HTTP request:

    - a request id (the client's X-Request-Id if tame, else a new one), in
      `request.state.request_id`, in the X-Request-Id response header and in error logs;
      and, with the caller's trace headers, in the RequestContext that logs and traces read
      (request_context.py);
    - 401 when an API key is set and `Authorization: Bearer <key>` does not match, on the
      protected paths; `request.state.authorized` tells the others whether the key was sent;
    - 503 for new POSTs once the server is draining; the others are counted for the drain;
    - 413 for a body over `max_body_bytes`: from Content-Length before reading anything,
      else as soon as the bytes read pass the limit;
    - a 500 with an OpenAI error body and no traceback for anything unhandled (the
      traceback goes to the log, with the request id);
    - `on_response` with the route and final status (499 when the client left first).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, drain: Drain, max_body_bytes: int,
                 routes: list[BaseRoute], on_response: OnResponse) -> None:
        self.app = app
        # Compared as digests: equal length, so compare_digest leaks nothing, not even the length.
        self._key_digest = _digest(api_key) if api_key else None
        self._drain = drain
        self._max_body_bytes = max_body_bytes
        self._routes = routes
        self._on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["authorized"] = self._is_authorized(headers)
        context_token = bind_request(RequestContext(request_id, trace_headers_of(headers)))
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        error = self._refusal(scope, headers, state["authorized"])
        try:
            if error is not None:
                await error.response()(scope, receive, send_with_id)
                return
            self._drain.num_active_requests += 1
            try:
                await self.app(scope, self._limited(receive), send_with_id)
            except Exception:
                logger.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"],
                                 request_id)
                if status is None:
                    body = error_body(f"Internal server error (request id {request_id}); see the server log.",
                                      "server_error", code="internal_error")
                    await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
            finally:
                self._drain.num_active_requests -= 1
        finally:
            status = STATUS_CLIENT_CLOSED if status is None else status
            if status == STATUS_CLIENT_CLOSED:
                self._log_client_closed(scope)
            self._on_response(self._route_of(scope), scope["method"], status)
            unbind_request(context_token)

    def _is_authorized(self, headers: Headers) -> bool:
        if self._key_digest is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._key_digest)

    def _refusal(self, scope: Scope, headers: Headers, authorized: bool) -> APIError | None:
        if not authorized and scope["path"].startswith(_PROTECTED_PREFIXES):
            return APIError(401, "Invalid or missing API key; send it as 'Authorization: Bearer <key>'.",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST" and self._drain.is_draining:
            return unavailable("The server is shutting down.", code="shutting_down")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body_bytes:
            # Answered before reading: uvicorn discards the unread body after the response.
            return body_too_large(self._max_body_bytes, int(length))
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that raises 413 once the body read so far passes the limit (bodies sent
        without Content-Length, or longer than it said)."""
        remaining = self._max_body_bytes

        async def limited_receive() -> Message:
            nonlocal remaining
            message = await receive()
            if message["type"] == "http.request":
                remaining -= len(message.get("body", b""))
                if remaining < 0:
                    raise body_too_large(self._max_body_bytes)
            return message

        return limited_receive

    def _route_of(self, scope: Scope) -> str:
        """The route's path template (a bounded label set), "none" for unknown paths."""
        route = scope.get("route")
        if route is None:  # refused before routing
            route = next((r for r in self._routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", "none")

    @staticmethod
    def _log_client_closed(scope: Scope) -> None:
        client = scope.get("client")
        path = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
        access_logger.info('%s - "%s %s HTTP/%s" %d', f"{client[0]}:{client[1]}" if client else "",
                           scope["method"], path, scope["http_version"], STATUS_CLIENT_CLOSED)
