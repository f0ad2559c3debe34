"""Tokens of a request: the worst case reserved before it is sent, and what it really used.

The gateway does not tokenize (it fronts any model). Its prompt estimate is an upper bound
for the byte-level BPE tokenizers of the models served this way: a token covers at least
one byte of text, so the UTF-8 length of the text, plus a margin per chat message for the
template's special tokens, is never below the real count. The completion's worst case is
max_tokens x n (or best_of) x the number of prompts. The real `usage` settles it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import bad_request

# Chat template tokens around each message (role markers, separators), generously, and the
# text a template wraps around tool definitions.
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_PER_REQUEST = 16
TOOLS_TEMPLATE_TOKENS = 256
# OpenAI's default on /v1/completions (vLLM's and tokenmill's too).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Estimate:
    prompt_tokens: int  # an upper bound
    completion_tokens: int  # max_tokens x n x prompts
    max_tokens: int  # per sequence, as the replica will be told
    max_tokens_given: bool  # False: the gateway sends `max_tokens` itself

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _text_tokens(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) + 2  # + BOS and the like
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return len(value)  # token ids: exact
    raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                      "lists of token ids.", param="prompt")


def _prompts(prompt: Any) -> list:
    """The prompts of a /v1/completions body (it may batch several)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    return [prompt]


def _whole(body: dict[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise bad_request(f"'{name}' must be a whole number >= {minimum}.", param=name)
    return value


def estimate(body: dict[str, Any], chat: bool, default_max_tokens: int) -> Estimate:
    """The worst case of one request body (clear 400s for fields it cannot read).

    Args:
        default_max_tokens: reserved (and sent) for a chat request that gives no limit;
            completions default to 16 tokens, as OpenAI's do.
    """
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty list of messages.", param="messages")
        # The messages as JSON hold every string the template renders (contents, names, tool
        # calls), escaped: never shorter than their UTF-8 bytes, so still an upper bound.
        prompt = (TEMPLATE_TOKENS_PER_REQUEST + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
                  + len(json.dumps(messages)))
        if body.get("tools"):
            prompt += TOOLS_TEMPLATE_TOKENS + len(json.dumps(body["tools"]))
        num_prompts = 1
        # The replicas (vLLM, tokenmill) take max_completion_tokens over max_tokens on chat.
        given = _whole(body, "max_completion_tokens", None, 0)
        given = _whole(body, "max_tokens", None, 0) if given is None else given
    else:
        if body.get("prompt") is None:
            raise bad_request("'prompt' is required.", param="prompt")
        prompts = _prompts(body["prompt"])
        prompt, num_prompts = sum(_text_tokens(p) for p in prompts), len(prompts)
        given = _whole(body, "max_tokens", None, 0)  # completions know no max_completion_tokens
        default_max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    n = _whole(body, "n", 1, 1)
    best_of = _whole(body, "best_of", n, 1)
    max_tokens = default_max_tokens if given is None else given
    return Estimate(prompt, max_tokens * max(n, best_of) * num_prompts, max_tokens, given is not None)


def upstream_body(body: dict[str, Any], raw: bytes, est: Estimate, stream: bool) -> tuple[bytes, bool]:
    """(the body to send, whether to drop the usage chunk from the stream): `max_tokens` set
    when the client gave none, so the replica cannot generate more than was reserved; the
    final `usage` chunk asked for on streams, to settle them. Unchanged bodies go as they came."""
    drop_usage = stream and not (body.get("stream_options") or {}).get("include_usage")
    if est.max_tokens_given and not drop_usage:
        return raw, False
    if not est.max_tokens_given:
        body["max_tokens"] = est.max_tokens
    if drop_usage:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(body).encode(), drop_usage


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


def routing_key(body: dict[str, Any], chat: bool, session_id: str | None) -> str:
    """What the routing policy keys on: the session when there is one (the affinity header,
    else the request's `user`), so a conversation stays on one replica; else the prompt."""
    affinity = session_id or body.get("user")
    return affinity if isinstance(affinity, str) and affinity else routing_text(body, chat)


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


_EVENT_END = re.compile(rb"\r?\n\r?\n")


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
        # Events end with a blank line: \n\n from most servers, \r\n\r\n from some.
        lf, crlf = self._buf.rfind(b"\n\n"), self._buf.rfind(b"\r\n\r\n")
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not cut:
            return b""
        ready, self._buf = self._buf[:cut], self._buf[cut:]
        if not self._drop and b'"usage"' not in ready:  # the common case: count and pass through
            self.chunks += ready.count(b"data: {")
            return ready
        out = []
        for event in _EVENT_END.split(ready)[:-1]:
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
