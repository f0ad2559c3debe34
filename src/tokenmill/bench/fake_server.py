"""A fast fake OpenAI-compatible server: the backend of overhead measurements.

`bench gateway` puts it behind the gateway to measure what the gateway adds; anything that
needs a backend which costs (almost) nothing uses it too. A raw ASGI app on uvicorn with
uvloop + httptools, no framework: measured here, that is the lean stack on loopback (a
FastAPI app costs several times more per request, and the point is to measure the thing in
front of this server, not this server).

Endpoints: GET /health, GET /v1/models, GET /metrics, POST /v1/completions and
/v1/chat/completions, non-streaming and streaming (SSE, one chunk per token, then
`data: [DONE]`). What a request gets:

- completion tokens = the request's `max_tokens` (chat: `max_completion_tokens`, else
  `max_tokens`), default 16; the text is that many copies of the token " ok";
  finish_reason is "length"; `n`, sampling parameters and stop strings are ignored;
- prompt_tokens = the number of whitespace-separated words of the prompt (a list of prompts:
  summed; token-id prompts: their length); for chat, of all message contents (text parts of
  content lists) summed. Deterministic, so tests and a proxy's token accounting can be
  checked exactly;
- `usage` on non-streaming responses; streaming with `stream_options.include_usage` true
  ends with a usage chunk whose `choices` is empty (OpenAI's shape), before [DONE];
- the `X-Request-Id` header, when sent, comes back on the response.

`--ttft-ms` delays the response head (hence the first byte), `--inter-token-ms` sleeps
between streamed chunks. With both 0, a streamed response is written in one piece.

This module imports nothing from tokenmill, so it runs as a file (`python -I
src/tokenmill/bench/fake_server.py`) without the package and torch: `bench gateway` starts it
that way, and `python -m tokenmill.bench.fake_server` / `tokenmill bench fake-server` re-exec
themselves so (about 30 MB resident instead of 230 MB, no seconds of torch import).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # orjson is only faster, not needed
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data)
else:
    _loads = orjson.loads

TOKEN = " ok"  # the text of every completion token
DEFAULT_MAX_TOKENS = 16
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_PROMETHEUS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
_DONE = b"data: [DONE]\n\n"

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BadRequest(ValueError):
    """A request the real API would answer with 400."""


def count_words(value: Any) -> int:
    """prompt_tokens of a prompt or message content: whitespace-separated words (see module doc)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # token ids
        return sum(count_words(v.get("text", "") if isinstance(v, dict) else v) for v in value)
    return 0


def _max_tokens(body: dict, is_chat: bool) -> int:
    value = body.get("max_completion_tokens") if is_chat else None
    value = body.get("max_tokens") if value is None else value
    value = DEFAULT_MAX_TOKENS if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"max_tokens must be a non-negative integer, got {value!r}")
    return value


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _error(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class FakeOpenAI:
    """The ASGI app. Owns its counters (served by /metrics); one instance per server."""

    def __init__(self, model: str = "fake", ttft_ms: float = 0.0, inter_token_ms: float = 0.0) -> None:
        self.model = model
        self.ttft_s = ttft_ms / 1000.0
        self.inter_token_s = inter_token_ms / 1000.0
        self.created = int(time.time())
        self.num_requests = {"/v1/completions": 0, "/v1/chat/completions": 0}
        self.num_completion_tokens = 0
        self.num_streams_cancelled = 0  # streams whose client left before the end
        self._ids = itertools.count()
        self._models = _dumps({"object": "list", "data": [
            {"id": model, "object": "model", "created": self.created, "owned_by": "tokenmill-fake",
             "root": model, "parent": None, "max_model_len": 1 << 20}]})

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        echo = [(b"x-request-id", v) for k, v in scope["headers"] if k == b"x-request-id"]
        path, method = scope["path"], scope["method"]
        if path in self.num_requests:
            if method != "POST":
                return await _respond(send, 405, _dumps(_error("use POST")), echo)
            return await self._generate(path, receive, send, echo)
        if path not in ("/health", "/v1/models", "/metrics"):
            return await _respond(send, 404, _dumps(_error(f"no route {path}", "not_found_error")), echo)
        if method != "GET":
            return await _respond(send, 405, _dumps(_error("use GET")), echo)
        if path == "/health":
            return await _respond(send, 200, b"", echo)
        if path == "/v1/models":
            return await _respond(send, 200, self._models, echo)
        await _respond(send, 200, self.metrics_text().encode(), echo, _PROMETHEUS)

    def metrics_text(self) -> str:
        lines = ["# HELP fake_server_requests_total Generation requests received, by path.",
                 "# TYPE fake_server_requests_total counter"]
        lines += [f'fake_server_requests_total{{path="{p}"}} {n}' for p, n in self.num_requests.items()]
        lines += ["# HELP fake_server_completion_tokens_total Completion tokens sent.",
                  "# TYPE fake_server_completion_tokens_total counter",
                  f"fake_server_completion_tokens_total {self.num_completion_tokens}",
                  "# HELP fake_server_streams_cancelled_total Streams whose client disconnected first.",
                  "# TYPE fake_server_streams_cancelled_total counter",
                  f"fake_server_streams_cancelled_total {self.num_streams_cancelled}"]
        return "\n".join(lines) + "\n"

    async def _generate(self, path: str, receive: Receive, send: Send, echo: list) -> None:
        self.num_requests[path] += 1
        is_chat = path == "/v1/chat/completions"
        try:
            body = _loads(await _read_body(receive))
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            num_tokens = _max_tokens(body, is_chat)
            if is_chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise BadRequest("messages must be a non-empty list")
                prompt_tokens = sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
            else:
                if "prompt" not in body:
                    raise BadRequest("prompt is required")
                prompt_tokens = count_words(body["prompt"])
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return await _respond(send, 400, _dumps(_error(str(exc) or "invalid JSON")), echo)
        self.num_completion_tokens += num_tokens
        request_id = f"{'chatcmpl' if is_chat else 'cmpl'}-fake-{next(self._ids)}"
        usage = _usage(prompt_tokens, num_tokens)
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = _chunks(request_id, self.model, is_chat, num_tokens, usage if include_usage else None)
            return await self._stream(chunks, max(num_tokens, 1), receive, send, echo)
        text = TOKEN * num_tokens
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                   "logprobs": None, "finish_reason": "length"} if is_chat else
                                  {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
        obj = {"id": request_id, "object": "chat.completion" if is_chat else "text_completion",
               "created": int(time.time()), "model": self.model, "choices": [choice], "usage": usage}
        await _respond(send, 200, _dumps(obj), echo)

    async def _stream(self, chunks: list[bytes], num_token_chunks: int, receive: Receive, send: Send,
                      echo: list) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [*echo, *_SSE]})
        if not self.inter_token_s:
            return await send({"type": "http.response.body", "body": b"".join(chunks)})
        gone = asyncio.Event()  # set when the client disconnects; stops the stream early
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        try:
            for i, chunk in enumerate(chunks):
                if 0 < i < num_token_chunks:  # between tokens, not before usage and [DONE]
                    await asyncio.sleep(self.inter_token_s)
                if gone.is_set():
                    self.num_streams_cancelled += 1
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


def _chunks(request_id: str, model: str, is_chat: bool, num_tokens: int, usage: dict | None) -> list[bytes]:
    """The SSE events of one streamed response: a chunk per token, [usage], [DONE]."""
    created = int(time.time())
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    out = []
    for i in range(num_tokens):
        last = i == num_tokens - 1
        if is_chat:
            delta = {"role": "assistant", "content": TOKEN} if i == 0 else {"content": TOKEN}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "length" if last else None}
        else:
            choice = {"index": 0, "text": TOKEN, "logprobs": None, "finish_reason": "length" if last else None}
        out.append(b"data: " + _dumps({"id": request_id, "object": obj, "created": created, "model": model,
                                       "choices": [choice]}) + b"\n\n")
    if num_tokens == 0:  # still say why it ended
        choice = ({"index": 0, "delta": {"role": "assistant", "content": ""}} if is_chat else
                  {"index": 0, "text": ""}) | {"logprobs": None, "finish_reason": "length"}
        out.append(b"data: " + _dumps({"id": request_id, "object": obj, "created": created, "model": model,
                                       "choices": [choice]}) + b"\n\n")
    if usage is not None:
        out.append(b"data: " + _dumps({"id": request_id, "object": obj, "created": created, "model": model,
                                       "choices": [], "usage": usage}) + b"\n\n")
    out.append(_DONE)
    return out


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        kind = (await receive())["type"]
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            return await send({"type": "lifespan.shutdown.complete"})


async def _respond(send: Send, status: int, body: bytes, echo: list, content_type: list = _JSON) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*content_type, *echo, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_fake_app(model: str = "fake", ttft_ms: float = 0.0, inter_token_ms: float = 0.0) -> FakeOpenAI:
    """The fake server as an ASGI app, for in-process use (uvicorn.Config(app, ...), httpx.ASGITransport).

    Args:
        model: the id /v1/models lists and responses carry (requests may name any model).
        ttft_ms: delay before the response head of every generation request.
        inter_token_ms: sleep between streamed chunks.
    """
    return FakeOpenAI(model, ttft_ms, inter_token_ms)


def run(port: int, host: str = "127.0.0.1", model: str = "fake", ttft_ms: float = 0.0,
        inter_token_ms: float = 0.0) -> None:
    """Serve until SIGINT/SIGTERM on uvicorn with uvloop and httptools (where installed)."""
    import uvicorn

    has = importlib.util.find_spec
    uvicorn.run(build_fake_app(model, ttft_ms, inter_token_ms), host=host, port=port,
                loop="uvloop" if has("uvloop") else "asyncio", http="httptools" if has("httptools") else "h11",
                lifespan="off", access_log=False, log_level="warning", server_header=False,
                timeout_keep_alive=75)  # idle load-generator connections survive between passes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m tokenmill.bench.fake_server` and `tokenmill bench fake-server`."""
    p.add_argument("--port", type=int, default=8000, help="Port to listen on (default %(default)s).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default %(default)s).")
    p.add_argument("--model", default="fake", help="Model id to list and answer with (default %(default)s).")
    p.add_argument("--ttft-ms", type=float, default=0.0, metavar="MS",
                   help="Delay before the first byte of every generation response (default 0).")
    p.add_argument("--inter-token-ms", type=float, default=0.0, metavar="MS",
                   help="Sleep between streamed chunks (default 0: the whole stream in one write).")


def exec_lean(argv: list[str]) -> None:
    """Replace this process by the fake server run as a file in isolated mode (-I): `python -m
    tokenmill.bench.fake_server` and `tokenmill bench fake-server` have imported the tokenmill
    package, hence torch (about 200 MB and seconds), which the fake server does not use."""
    os.execv(sys.executable, [sys.executable, "-I", __file__, *argv])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fake_server", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if "torch" in sys.modules:
        exec_lean(sys.argv[1:] if argv is None else argv)
    run(args.port, args.host, args.model, args.ttft_ms, args.inter_token_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
