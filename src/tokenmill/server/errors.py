"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise APIError; the app turns it into a JSON response. Types follow OpenAI's:
invalid_request_error for anything the client can fix, server_error otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

# Seconds a client should wait before retrying an overloaded or draining server.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse_error_events(message: str, code: str) -> bytes:
    """The end of a stream that broke after its first event (a replica or backend died): an
    OpenAI-style error event, then `[DONE]`, so clients stop instead of waiting."""
    body = json.dumps(error_body(message, "server_error", code=code))
    return f"data: {body}\n\ndata: [DONE]\n\n".encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> APIError:
    """503 with Retry-After: the client may try again (the OpenAI SDK does so by itself)."""
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def from_validation_error(e: ValidationError) -> APIError:
    """A 400 naming the first invalid field, instead of FastAPI's 422 with pydantic's dump."""
    err = e.errors(include_url=False)[0]
    param = ""
    for part in err["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"  # messages[0].role, as OpenAI names list items
        elif "[" not in part and part not in ("str", "int", "float", "bool"):
            # (union members add their type to the path, "prompt.list[int]"; dropped)
            param += f".{part}" if param else part
    param = param or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return bad_request(f"'{param}' is a required field.", param=param)
    return bad_request(f"Invalid value for '{param}': {msg}.", param=param)


def from_value_error(e: ValueError, default_param: str | None = None) -> APIError:
    """A 400 from a ValueError; SamplingParams sets `.param` on its errors."""
    return bad_request(str(e), param=getattr(e, "param", default_param))
