"""Pure ASGI middleware (not BaseHTTPMiddleware, which wraps `receive` and would hide the
client's disconnect from the handlers): request id, API key, draining, clean 500s."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import APIError, error_body, unavailable

logger = logging.getLogger("tokenmill.server")

# Paths that need the API key when one is set; probes and scrapes stay open, as in vLLM.
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# A client-supplied X-Request-Id is echoed into logs and headers only if it is this tame.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class RequestContextMiddleware:
    """For every HTTP request:

    - a request id (the client's X-Request-Id if tame, else a new one), in
      `request.state.request_id`, in the X-Request-Id response header and in error logs;
    - 401 when an API key is set and `Authorization: Bearer <key>` does not match;
    - 503 for new POSTs once the server is draining;
    - a 500 with an OpenAI error body and no traceback for anything unhandled (the
      traceback goes to the log, with the request id).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, is_draining: Callable[[], bool]) -> None:
        self.app = app
        # Compared as digests: equal length, so compare_digest leaks nothing, not even the length.
        self._key_digest = _digest(api_key) if api_key else None
        self._is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        error = self._refusal(scope, headers)
        if error is not None:
            await error.response()(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"], request_id)
            if not response_started:
                body = error_body(f"Internal server error (request id {request_id}); see the server log.",
                                  "server_error", code="internal_error")
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)

    def _refusal(self, scope: Scope, headers: Headers) -> APIError | None:
        path = scope["path"]
        if self._key_digest is not None and path.startswith(_PROTECTED_PREFIXES):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(token.strip()), self._key_digest):
                return APIError(401, "Invalid or missing API key; send it as 'Authorization: Bearer <key>'.",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST" and self._is_draining():
            return unavailable("The server is shutting down.", code="shutting_down")
        return None
