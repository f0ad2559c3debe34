"""Bare ASGI helpers: the gateway's hot path skips a web framework (each layer costs tens of
microseconds per request, and the gateway's whole budget is a couple of milliseconds)."""

from __future__ import annotations

import json
from typing import Any

from tokenmill.server.errors import APIError


def header(scope: dict, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def read_body(receive, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"The request body is larger than the {max_bytes} bytes this server takes.",
                           code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"The body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(obj, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_json")
    return obj


def _raw_headers(headers: dict[str, str] | None, content_type: bytes) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", content_type)]
    for k, v in (headers or {}).items():
        out.append((k.encode("latin-1"), v.encode("latin-1")))
    return out


async def send_bytes(send, status: int, body: bytes, headers: dict[str, str] | None = None,
                     content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status, "headers": _raw_headers(headers, content_type)})
    await send({"type": "http.response.body", "body": body})


async def send_json(send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    await send_bytes(send, status, json.dumps(obj).encode(), headers)


async def send_error(send, error: APIError, headers: dict[str, str] | None = None) -> None:
    await send_json(send, error.status, error.body(), {**(error.headers or {}), **(headers or {})})


class ClientGone(Exception):
    """The client closed its connection."""
