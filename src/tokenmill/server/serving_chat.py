"""POST /v1/chat/completions: the checkpoint's chat template, n samples, streaming with
the role in the first chunk and usage on request, logprobs with top_logprobs, tool calls."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.outputs import RequestOutput
from tokenmill.server.errors import bad_request, from_value_error
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from tokenmill.server.responses import SampleState
from tokenmill.server.serving_engine import OpenAIServing
from tokenmill.server.streaming import ChunkWriter
from tokenmill.server.structured import structured_outputs_from, tools_from
from tokenmill.server.unsupported import UNSUPPORTED_CHAT
from tokenmill.tokenizer import Tokenizer
from tokenmill.tools import ToolsRequest, ToolTemplate

# OpenAI's "developer" role replaces "system" for its newer models; templates know "system".
_ROLE_ALIASES = {"developer": "system"}
_ROLES = ("system", "user", "assistant", "tool")
# Template variables the server sets itself; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "chat_template", "tools", "documents"})


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; 400 for what tokenmill cannot render.

    Text parts stay a list: Tokenizer.apply_chat_template joins them itself.
    """
    if not messages:
        raise bad_request("messages must not be empty.", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = _ROLE_ALIASES.get(m.role, m.role)
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role {m.role!r} is not supported; use one of system, user, "
                              "assistant, tool.", param=f"messages[{i}].role")
        extra = m.model_extra or {}
        if extra.get("function_call"):
            raise bad_request("function_call in messages is the legacy function calling; send tool_calls.",
                              param=f"messages[{i}].function_call", code="unsupported_parameter")
        content = m.content
        if content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}].content is required for role {role!r}.",
                                  param=f"messages[{i}].content")
            content = ""
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(
                        f"messages[{i}].content[{j}] has type {part.get('type')!r}; only text "
                        "parts are supported.", param=f"messages[{i}].content[{j}].type")
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if role == "assistant" and m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None = None, tools: ToolsRequest | None = None) -> str:
    """The prompt text the checkpoint's chat template makes of `messages` and `tools`; 400
    if it cannot."""
    try:
        msgs, variables = ToolTemplate.of(tokenizer.chat_template).messages(template_messages(messages), tools)
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}), **variables)
    except ValueError as e:
        raise from_value_error(e, "messages") from None


class ServingChat(OpenAIServing):
    async def create(self, raw_request: Request) -> Response:
        start = time.monotonic()
        req = await self.parse(raw_request, ChatCompletionRequest, UNSUPPORTED_CHAT)
        model = self.check_request(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
        self.check_num_logprobs(req.top_logprobs, "top_logprobs")
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        reserved = _RESERVED_TEMPLATE_KWARGS & set(req.chat_template_kwargs or {})
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}.",
                              param="chat_template_kwargs")
        self.admission.check_size(req.n)
        tokenizer = self.require_tokenizer("messages")
        tools = tools_from(req.model_extra or {})
        prompt = render_chat(tokenizer, req.messages, req.add_generation_prompt, req.chat_template_kwargs, tools)
        # The template writes the special tokens itself (no second BOS).
        prompt_ids = await self.encode_prompt(prompt, add_special_tokens=False, param="messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(len(prompt_ids), getattr(req, param), "messages", param)
        overrides: dict[str, Any] = {}
        tool_template = None
        if tools is not None:  # the output follows the tool-call grammar
            tool_template = ToolTemplate.of(tokenizer.chat_template)
            try:
                overrides["structured_outputs"] = tool_template.constraint(
                    tools, structured_outputs_from(req.model_extra or {}))
            except ValueError as e:
                raise from_value_error(e) from None
        params = await self.sampling_params(req, max_tokens=max_tokens, logprobs=num_top, **overrides)
        self.validate_prompt(prompt_ids, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        reservation = self.admission.reserve(req.n)
        self.metrics.record_params(req.n, max_tokens)
        stream = self.generate(prompt_ids, params, request_id, prompt, reservation)
        envelope = {"id": request_id, "created": int(time.time()), "model": model}
        if req.stream:
            writer = self.chunk_writer(req, ChatCompletionChunk(**envelope, choices=[]), [len(prompt_ids)] * req.n)
            return self.stream_response(raw_request, req, writer,
                                        self._events(req, writer, stream, num_top, tool_template),
                                        len(prompt_ids), start, reservation)
        body = self._full(req, envelope, len(prompt_ids), stream, num_top, tool_template)
        return await self.full_response(raw_request, request_id, body, start, reservation)

    async def _full(self, req: ChatCompletionRequest, envelope: dict[str, Any], num_prompt: int,
                    stream: AsyncIterator[RequestOutput], num_top: int | None,
                    tool_template: ToolTemplate | None) -> ChatCompletionResponse:
        samples = [SampleState() for _ in range(req.n)]
        async with aclosing(stream):
            async for out in stream:
                for o in out.outputs:
                    samples[o.index].add(o)
        choices = []
        for i, s in enumerate(samples):
            logprobs = None
            if num_top is not None:
                logprobs = ChatLogprobs(content=chat_logprobs(self.tokenizer, s.token_ids, s.logprobs, num_top))
            content, calls = tool_template.parse(s.text) if tool_template is not None else (s.text, [])
            choices.append(ChatChoice(
                index=i, message=AssistantMessage(content=content, tool_calls=[c.as_openai() for c in calls]),
                logprobs=logprobs, finish_reason=_finish_reason(s.finish_reason, bool(calls)),
                stop_reason=s.stop_reason))
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=sum(len(s.token_ids) for s in samples))
        return ChatCompletionResponse(**envelope, choices=choices, usage=usage)

    async def _events(self, req: ChatCompletionRequest, writer: ChunkWriter, stream: AsyncIterator[RequestOutput],
                      num_top: int | None, tool_template: ToolTemplate | None) -> AsyncIterator[str]:
        # The role comes first, before any text, for every choice (as OpenAI sends it).
        for i in range(req.n):
            yield writer.choice_event(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        tool_streams = [tool_template.stream() for _ in range(req.n)] if tool_template is not None else None
        async with aclosing(stream):
            async for out in stream:
                for o in out.outputs:
                    if not o.text and not o.token_ids and o.finish_reason is None:
                        continue
                    content, calls, finish = o.text or None, None, o.finish_reason
                    if tool_streams is not None:
                        tool_stream = tool_streams[o.index]
                        text, deltas = tool_stream.feed(o.text, final=o.finish_reason is not None)
                        content, calls = text or None, deltas or None
                        finish = _finish_reason(o.finish_reason, tool_stream.called)
                    logprobs = None
                    if num_top is not None:
                        logprobs = ChatLogprobs(content=chat_logprobs(
                            self.tokenizer, o.token_ids, o.logprobs or [], num_top))
                    yield writer.choice_event(ChatChunkChoice(
                        index=o.index, delta=DeltaMessage(content=content, tool_calls=calls), logprobs=logprobs,
                        finish_reason=finish, stop_reason=o.stop_reason), o)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" when a reply that ended by itself holds calls."""
    return "tool_calls" if called and reason == "stop" else reason
