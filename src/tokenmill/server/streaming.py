"""Async plumbing shared by the handlers: SSE events and responses, disconnect watching,
merging several engine streams (one per prompt of a completions request) into one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from tokenmill.outputs import CompletionOutput
from tokenmill.server.protocol import ChatChunkChoice, CompletionChoice, ResponseBase, UsageInfo

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"

# nginx's "client closed request": logged in the access log; never reaches the client.
STATUS_CLIENT_CLOSED = 499


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class ChunkWriter:
    """Writes the events of one streamed response, one choice each, and counts what they
    carried (for the usage event and the log line).

    Every event repeats the envelope (id, object, created, model, usage: null), so it is
    serialized once per response here instead of once per token.
    """

    def __init__(self, envelope: ResponseBase, continuous_usage_prompt_tokens: list[int] | None = None) -> None:
        """Args:
            envelope: the response with `choices=[]` and no usage.
            continuous_usage_prompt_tokens: for vLLM's continuous usage stats, the prompt
                length of each choice (by index); every event then carries that choice's
                usage so far instead of `usage: null`.
        """
        self._envelope = envelope
        # No JSON string holds an unescaped quote, so these find the fields themselves.
        head, marker, tail = envelope.model_dump_json().partition('"choices":[]')
        assert marker and '"usage":null' in tail, "the envelope must have choices=[] and no usage"
        self._head = f'data: {head}"choices":['
        self._tail = f"]{tail}\n\n"
        self._continuous_prompt_tokens = continuous_usage_prompt_tokens
        self.request_id = envelope.id
        self.num_completion_tokens = 0
        self.tokens_per_choice: dict[int, int] = {}
        self.finish_reasons: dict[int, str] = {}  # choice index -> reason, in finishing order

    def choice_event(self, choice: CompletionChoice | ChatChunkChoice,
                     out: CompletionOutput | None = None) -> str:
        """The event for `choice`; `out` is the engine output it carries, if any."""
        index = choice.index
        if out is not None:
            self.num_completion_tokens += len(out.token_ids)
            self.tokens_per_choice[index] = self.tokens_per_choice.get(index, 0) + len(out.token_ids)
            if out.finish_reason is not None:
                self.finish_reasons[index] = out.finish_reason
        tail = self._tail
        if self._continuous_prompt_tokens is not None:
            usage = UsageInfo(prompt_tokens=self._continuous_prompt_tokens[index],
                              completion_tokens=self.tokens_per_choice.get(index, 0))
            tail = tail.replace('"usage":null', f'"usage":{usage.model_dump_json()}', 1)
        return self._head + choice.model_dump_json() + tail

    def usage_event(self, usage: UsageInfo) -> str:
        """The last event with `stream_options.include_usage`: no choices, only the usage."""
        return sse_event(self._envelope.model_copy(update={"usage": usage}))


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator and then runs
    `on_close`, even when the client left before the first byte: the generator's
    `finally` (which aborts engine requests) and the admission release both run."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], waiting_on_client=None) -> None:
        """`waiting_on_client`: a gauge (inc/dec) counting this stream while a write of it
        waits for the client to read (the server's flow control holds it)."""
        # X-Accel-Buffering: tell nginx-style proxies not to buffer the stream.
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._waiting_on_client = waiting_on_client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gauge = self._waiting_on_client
        if gauge is not None:
            plain_send = send

            async def send(message: Message) -> None:
                gauge.inc()
                try:
                    await plain_send(message)
                finally:
                    gauge.dec()
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (call once the body has been read: the next ASGI
    message is then the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work`; if the client disconnects first, cancel it and answer 499.

    Cancelling the work ends its engine streams, which aborts the engine requests and frees
    their KV blocks before the next step; no one is left to read a result anyway.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    return Response(status_code=STATUS_CLIENT_CLOSED)


_END = object()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive; yields (stream index, item).

    Closing or cancelling the merged iterator cancels every stream still running.
    """
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
        except Exception as e:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _END))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        # Not awaited: the cancellation reaches each stream's `finally` on the next loop
        # iteration, and awaiting here could itself be cancelled by a disconnect.
        for t in tasks:
            t.cancel()
