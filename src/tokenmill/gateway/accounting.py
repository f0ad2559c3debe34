"""Tokens of a request: the worst case reserved before it is sent, and what it really used.

The gateway does not tokenize (it fronts any model). Its prompt estimate is an upper bound
for the byte-level BPE tokenizers of the models served this way: a token covers at least
one byte of text, so the UTF-8 length of the text, plus a margin per chat message for the
template's special tokens, is never below the real count. The real `usage` settles it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import bad_request

# Chat template tokens around each message (role markers, separators), generously.
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_PER_REQUEST = 16


@dataclass(frozen=True)
class Estimate:
    prompt_tokens: int  # an upper bound
    completion_tokens: int  # max_tokens x n
    max_tokens_given: bool  # False: the gateway sends its default max_tokens

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _text_tokens(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)  # token ids: exact
        return sum(_text_tokens(v) for v in value)
    if isinstance(value, dict):  # content parts: {"type": "text", "text": ...}
        return _text_tokens(value.get("text", ""))
    return 0


def estimate(body: dict[str, Any], chat: bool, default_max_tokens: int) -> Estimate:
    """The worst case of one request body (clear 400s for fields it cannot read)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty list of messages.", param="messages")
        prompt = TEMPLATE_TOKENS_PER_REQUEST + sum(
            TEMPLATE_TOKENS_PER_MESSAGE + _text_tokens(m.get("content")) if isinstance(m, dict) else 0
            for m in messages)
        if body.get("tools"):
            prompt += len(json.dumps(body["tools"]))
    else:
        if "prompt" not in body:
            raise bad_request("'prompt' is required.", param="prompt")
        p = body["prompt"]
        token_ids = isinstance(p, list) and bool(p) and all(isinstance(t, int) for t in p)
        prompt = _text_tokens(p) + (0 if token_ids else 2)  # text: BOS and the like
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    if given is not None and (not isinstance(given, int) or isinstance(given, bool) or given < 0):
        raise bad_request("'max_tokens' must be a whole number >= 0.", param="max_tokens")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad_request("'n' must be a whole number >= 1.", param="n")
    max_tokens = default_max_tokens if given is None else given
    return Estimate(prompt, max_tokens * max(n, body.get("best_of") or 1), given is not None)


def routing_text(body: dict[str, Any], chat: bool) -> str:
    """The text whose prefix decides the replica (what the engines' prefix caches key on)."""
    if chat:
        parts = []
        for m in body.get("messages") or ():
            if isinstance(m, dict):
                c = m.get("content")
                parts.append(f"{m.get('role', '')}\x1f{c if isinstance(c, str) else json.dumps(c)}\x1e")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and not isinstance(prompt[0], int) else json.dumps(prompt)
    return prompt if isinstance(prompt, str) else ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_of(obj: Any) -> Usage | None:
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None
    try:
        return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return None


class SseRelay:
    """Cuts an upstream SSE byte stream into whole events as they arrive, counts the
    generated chunks, keeps the last `usage`, and drops the usage-only chunk the gateway
    asked for when the client did not."""

    def __init__(self, drop_usage_chunk: bool) -> None:
        self._buf = b""
        self._drop = drop_usage_chunk
        self.chunks = 0  # events with choices: about one token each
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> bytes:
        """The bytes to pass on now (whole events only)."""
        self._buf += data
        cut = self._buf.rfind(b"\n\n")
        if cut < 0:
            return b""
        ready, self._buf = self._buf[:cut + 2], self._buf[cut + 2:]
        if not self._drop and b'"usage"' not in ready:  # the common case: count and pass through
            self.chunks += ready.count(b"data: {")
            return ready
        out = []
        for event in ready.split(b"\n\n")[:-1]:
            if event.startswith(b"data: {") and (b'"usage":{' in event or b'"usage": {' in event):
                try:
                    obj = json.loads(event[6:])
                except ValueError:
                    obj = None
                self.usage = usage_of(obj) or self.usage
                if isinstance(obj, dict) and not obj.get("choices"):
                    if self._drop:
                        continue
                else:
                    self.chunks += 1
            elif event.startswith(b"data: {"):
                self.chunks += 1
            out.append(event + b"\n\n")
        return b"".join(out)

    def rest(self) -> bytes:
        """What is left when the upstream ends (a last event without its blank line)."""
        rest, self._buf = self._buf, b""
        return rest
