"""The two ways a response ends, shared by the generating handlers: one JSON body once
every sample has finished, or SSE events then [DONE]; and the log line of each."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.outputs import CompletionOutput, PositionLogprobs
from tokenmill.server.admission import Reservation
from tokenmill.server.args import ServerSettings
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.protocol import ResponseBase, SamplingFields, UsageInfo
from tokenmill.server.request_context import current_request
from tokenmill.server.streaming import (
    SSE_DONE,
    STATUS_CLIENT_CLOSED,
    ChunkWriter,
    SSEResponse,
    sse_event,
)

logger = logging.getLogger("tokenmill.server")


@dataclass
class SampleState:
    """One choice's accumulated output, for non-streaming responses."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, out: CompletionOutput) -> None:
        self.text_parts.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class ResponseWriter:
    """Mixin of OpenAIServing: the response tails and their log lines."""

    settings: ServerSettings

    async def full_response(self, raw_request: Request, request_id: str, body: Awaitable[ResponseBase],
                            start: float, reservation: Reservation) -> Response:
        """A non-streaming response: `body` once every sample has finished."""
        try:
            done = await body
        except asyncio.CancelledError:  # the client left (run_until_disconnect)
            self.log_unfinished(raw_request, request_id, start)
            raise
        finally:
            reservation.release_all()
        self.log_request(raw_request, done.id, done.usage, [c.finish_reason for c in done.choices], start)
        return Response(done.model_dump_json(), media_type="application/json")

    def stream_response(self, raw_request: Request, req: SamplingFields, writer: ChunkWriter,
                        events: AsyncIterator[str], num_prompt: int, start: float,
                        reservation: Reservation) -> SSEResponse:
        """A streaming response: the handler's `events`, the usage event if asked, [DONE]."""
        body = self._sse_body(raw_request, req, writer, events, num_prompt, start)
        return SSEResponse(body, on_close=reservation.release_all,
                           waiting_on_client=self.metrics.streams_waiting_on_client)

    def chunk_writer(self, req: SamplingFields, envelope: ResponseBase, prompt_tokens: list[int]) -> ChunkWriter:
        """The writer of a stream's events; `prompt_tokens[i]`: choice i's prompt length,
        which every event carries in its usage if the client asked for continuous usage."""
        continuous = req.stream_options is not None and req.stream_options.wants_continuous_usage
        return ChunkWriter(envelope, prompt_tokens if continuous else None)

    async def _sse_body(self, raw_request: Request, req: SamplingFields, writer: ChunkWriter,
                        events: AsyncIterator[str], num_prompt: int, start: float) -> AsyncIterator[str]:
        is_done = False
        try:
            # The 200 status line went out before the first event, so an error can only be
            # told as one last event.
            try:
                async with aclosing(events):
                    async for event in events:
                        yield event
                usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=writer.num_completion_tokens)
                if req.stream_options is not None and req.stream_options.wants_final_usage:
                    yield writer.usage_event(usage)
                self.log_request(raw_request, writer.request_id, usage, list(writer.finish_reasons.values()),
                                 start)
            except APIError as e:
                yield sse_event(e.body())
            except Exception:
                logger.exception("%s failed while streaming", writer.request_id)
                yield sse_event(error_body(f"Internal server error while streaming {writer.request_id}; "
                                           "see the server log.", "server_error", code="internal_error"))
            yield SSE_DONE
            is_done = True
        finally:
            if not is_done:  # closed or cancelled at a yield: the client left
                self.log_unfinished(raw_request, writer.request_id, start)

    def log_request(self, raw_request: Request, request_id: str, usage: UsageInfo,
                    finish_reasons: list[str | None], start: float) -> None:
        if self.settings.log_requests:
            logger.info("%s (x-request-id %s): %d prompt + %d completion tokens, finish=%s, %.3f s",
                        request_id, getattr(raw_request.state, "request_id", "-"), usage.prompt_tokens,
                        usage.completion_tokens, ",".join(str(r) for r in finish_reasons),
                        time.monotonic() - start,
                        extra=_finished_fields(raw_request, request_id, 200, start, usage, finish_reasons))

    def log_unfinished(self, raw_request: Request, request_id: str, start: float) -> None:
        if self.settings.log_requests:
            logger.info("%s (x-request-id %s): client disconnected, aborted after %.3f s", request_id,
                        getattr(raw_request.state, "request_id", "-"), time.monotonic() - start,
                        extra=_finished_fields(raw_request, request_id, STATUS_CLIENT_CLOSED, start))


def _finished_fields(raw_request: Request, response_id: str, status: int, start: float,
                     usage: UsageInfo | None = None, finish_reasons: list[str | None] | None = None) -> dict:
    """The fields of a request's "finished" record, which --log-format json writes out: the ids
    that join it to the client (X-Request-Id, response id) and to its trace, its status and
    tokens, and the engine's timings (seconds; queue/ttft/e2e as the metrics define them, over
    its prompts) next to `duration_s`, the handler's own time from the body read to the end."""
    ctx = current_request()
    fields = {
        "request_id": getattr(raw_request.state, "request_id", None),
        "response_id": response_id,
        "trace_id": ctx.trace_id if ctx is not None else None,
        "method": raw_request.method,
        "path": raw_request.scope["path"],
        "status": status,
        "duration_s": round(time.monotonic() - start, 6),
        **(ctx.timings() if ctx is not None else {}),
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "completion_tokens": usage.completion_tokens if usage is not None else None,
        "finish_reasons": finish_reasons,
    }
    return {name: value for name, value in fields.items() if value is not None}
