"""One HTTP request carried from the ingress to an engine replica, and run there through the
replica's own `tokenmill serve` app in-process.

The replica's answer comes back as the app's ASGI messages (`http.response.start`, then
`http.response.body` parts), so every route, error body, header and SSE event is the one
`tokenmill serve` produces: the Ray path has no second implementation of the API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]  # an ASGI message


@dataclass(frozen=True)
class HTTPCall:
    """A request as the ingress read it; `routing_text` is what the request router's prefix
    policy keys on ("" for requests with no prompt: any replica will do)."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None
    routing_text: str = ""


_DONE = object()


def _scope(call: HTTPCall) -> dict[str, Any]:
    # No ASGI spec_version 2.4: the app then listens on receive() for the disconnect that the
    # replica delivers when the ingress cancels the call (2.4 apps would expect send to fail).
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
            "scheme": "http", "path": call.path, "raw_path": call.path.encode(), "root_path": "",
            "query_string": call.query_string, "headers": list(call.headers), "client": call.client,
            "server": ("ray-serve-replica", 0), "state": {}}


async def call_asgi(app: Any, call: HTTPCall, extra_headers: tuple[tuple[bytes, bytes], ...] = (),
                    batch_s: float = 0.0) -> AsyncIterator[list[Message]]:
    """The app's ASGI messages for `call`, in order, in batches: each batch is what the app
    sent since the last one. With `batch_s` > 0, batches after the first body part are at
    least that far apart (fewer, larger items through Ray per stream: each item costs CPU in
    the replica, the ingress and the proxy); the first body part always goes at once (TTFT),
    and so does the end of the response: until the call ends, Serve counts the request as
    running on the replica (the router's load, `max_ongoing_requests`, autoscaling).

    Closing the iterator early (the ingress cancelled: its client left, or it gave up) tells
    the app its client disconnected, so it aborts the engine requests as it would for a
    closed socket; the app finishes on its own in the background.
    """
    messages: asyncio.Queue = asyncio.Queue()
    client_gone = asyncio.Event()
    ended = asyncio.Event()  # the app sent its last body part, or returned
    body_delivered = False

    async def receive() -> Message:
        nonlocal body_delivered
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await client_gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if client_gone.is_set():
            raise OSError("the ingress closed the call")
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", ()), *extra_headers]}
        messages.put_nowait(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended.set()

    def app_returned(_) -> None:
        messages.put_nowait(_DONE)
        ended.set()

    task = asyncio.ensure_future(app(_scope(call), receive, send))
    task.add_done_callback(app_returned)
    loop = asyncio.get_running_loop()
    body_started, last_batch_at, done = False, 0.0, False
    try:
        while not done:
            batch = [await messages.get()]
            if body_started and batch_s > 0 and not ended.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ended.wait(), last_batch_at + batch_s - loop.time())
            while not messages.empty():
                batch.append(messages.get_nowait())
            if batch[-1] is _DONE:
                batch.pop()
                done = True
            if batch:
                body_started = body_started or any(m["type"] == "http.response.body" for m in batch)
                last_batch_at = loop.time()
                yield batch
        task.result()  # the app answers its own errors; an exception here is a bug, surfaced
    finally:
        if not task.done():
            client_gone.set()
            _background.add(task)
            task.add_done_callback(_forget)


_background: set[asyncio.Future] = set()  # apps finishing after their caller left


def _forget(task: asyncio.Future) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an OSError from send after the disconnect is expected
