"""A tiny OpenAI-compatible streaming server with scripted token timings, for bench tests.

One script drives two adapters:
- `VirtualTransport`: an httpx transport that advances a virtual clock by each scripted
  delay just before the client reads the chunk, so measured timings are exact;
- `RealServer`: the same script as an ASGI app under uvicorn on loopback, with real sleeps.
Tokens are words "t0 t1 ..." so a whitespace tokenizer counts them exactly.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from tokenmill.bench.server_process import free_port


@dataclass
class Script:
    """How the server answers one request."""

    ttft_s: float = 0.1
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (gap before chunk i>0, tokens)
    usage: str = "continuous"  # continuous | final | none
    status: int = 200
    role_chunk: bool = True  # chat: a content-less role delta before the first token
    cut_after: int | None = None  # close the stream after this many chunks (no [DONE])
    prompt_tokens: int = 7


def uniform_script(num_tokens: int, ttft_s: float, itl_s: float, **kw) -> Script:
    return Script(ttft_s=ttft_s, chunks=[(0.0 if i == 0 else itl_s, 1) for i in range(num_tokens)], **kw)


class FakeState:
    """Per-server bookkeeping the tests read (request bodies, peak concurrency)."""

    def __init__(self, script_for: Callable[[dict], Script]) -> None:
        self.script_for = script_for
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def stream_events(state: FakeState, path: str, body: dict) -> AsyncIterator[tuple[float, bytes]]:
    """(delay before sending, bytes) pairs of one streamed response."""
    script = state.script_for(body)
    is_chat = path.endswith("chat/completions")
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    word = 0

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
        if is_chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish}

    if is_chat and script.role_chunk:
        # Sent at once, before any token: a TTFT taken here would be wrong.
        yield 0.0, _sse({"object": obj, "choices": [choice(None, None, role=True)]})
    done = 0
    for i, (gap, k) in enumerate(script.chunks):
        if script.cut_after is not None and i >= script.cut_after:
            return
        text = "".join(f"t{word + j} " for j in range(k))
        word += k
        done += k
        finish = "length" if i == len(script.chunks) - 1 else None
        msg: dict = {"object": obj, "choices": [choice(text, finish)]}
        if script.usage == "continuous":
            msg["usage"] = {"prompt_tokens": script.prompt_tokens, "completion_tokens": done}
        yield (script.ttft_s if i == 0 else gap), _sse(msg)
    if script.usage != "none":
        usage = {"prompt_tokens": script.prompt_tokens, "completion_tokens": done,
                 "total_tokens": script.prompt_tokens + done}
        yield 0.0, _sse({"object": obj, "choices": [], "usage": usage})
    yield 0.0, _sse("[DONE]")


def _json_routes(path: str) -> tuple[int, dict] | None:
    if path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
    if path == "/version":
        return 200, {"name": "fake", "version": "0.0"}
    if path == "/health":
        return 200, {}
    return None


class VirtualClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class _VirtualStream(httpx.AsyncByteStream):
    def __init__(self, events: AsyncIterator[tuple[float, bytes]], clock: VirtualClock, state: FakeState) -> None:
        self._events, self._clock, self._state = events, clock, state

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for delay, data in self._events:
                self._clock.now_s += delay  # time passes, then the client reads this chunk
                yield data
        finally:
            self._state.in_flight -= 1


class VirtualTransport(httpx.AsyncBaseTransport):
    """Serves the fake API in-process on a virtual clock (one request at a time is exact)."""

    def __init__(self, state: FakeState, clock: VirtualClock) -> None:
        self.state, self.clock = state, clock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET":
            status, obj = _json_routes(path) or (404, {"error": "not found"})
            return httpx.Response(status, json=obj)
        body = json.loads(await request.aread())
        self.state.bodies.append(body)
        script = self.state.script_for(body)
        if script.status != 200:
            return httpx.Response(script.status, json={"error": {"message": "scripted failure"}})
        self.state.in_flight += 1
        self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=_VirtualStream(stream_events(self.state, path, body), self.clock, self.state))


def make_asgi_app(state: FakeState):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if scope["method"] == "GET":
            status, obj = _json_routes(path) or (404, {"error": "not found"})
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(obj).encode()})
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        body = json.loads(raw)
        state.bodies.append(body)
        script = state.script_for(body)
        if script.status != 200:
            await send({"type": "http.response.start", "status": script.status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "scripted"}}'})
            return
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            async for delay, data in stream_events(state, path, body):
                if delay:
                    await asyncio.sleep(delay)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            state.in_flight -= 1

    return app


class RealServer:
    """uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, state: FakeState) -> None:
        import uvicorn

        self.state = state
        self.port = free_port()
        config = uvicorn.Config(make_asgi_app(state), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RealServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
