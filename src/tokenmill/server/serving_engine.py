"""What every OpenAI handler shares: body parsing, model check, tokenization, sampling
params, context-length check, the engine stream, and the two ways a response ends (one
JSON body, or SSE events then [DONE])."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.engine.async_llm import AsyncLLM, EngineDeadError
from tokenmill.engine.llm import default_sampling_params
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.admission import Admission, Reservation
from tokenmill.server.args import ServerSettings
from tokenmill.server.errors import (
    APIError,
    bad_request,
    error_body,
    from_validation_error,
    from_value_error,
    unavailable,
)
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.prompt_encoder import PromptEncoder
from tokenmill.server.protocol import OpenAIBaseModel, ResponseBase, SamplingFields, UsageInfo
from tokenmill.server.streaming import (
    SSE_DONE,
    ChunkWriter,
    SSEResponse,
    run_until_disconnect,
    sse_event,
)
from tokenmill.server.unsupported import IGNORED_FIELDS, Unsupported

logger = logging.getLogger("tokenmill.server")

M = TypeVar("M", bound=OpenAIBaseModel)

# OpenAI's own limit on n.
MAX_N = 128


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


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics,
                 admission: Admission, encoder: PromptEncoder) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        self.encode = encoder.encode
        self.max_model_len = engine.config.scheduler.max_model_len
        # The checkpoint's generation_config.json defaults apply when a field is not sent.
        self.defaults = default_sampling_params(engine.config.model_path)
        self._warned_fields: set[str] = set()

    # ---- request parsing -------------------------------------------------------------------

    async def parse(self, raw_request: Request, model_cls: type[M], unsupported: Unsupported) -> M:
        """Read the JSON body into `model_cls`; 400 for malformed JSON, bad fields, and
        features that are not implemented."""
        body = await raw_request.body()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"The request body is not valid JSON: {e}.") from None
        if not isinstance(data, dict):
            raise bad_request("The request body must be a JSON object.")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None
        for name, value in (req.model_extra or {}).items():
            check = unsupported.get(name)
            if check is not None and not check[0](value):
                raise bad_request(f"{check[1]} is not supported by tokenmill yet.", param=name,
                                  code="unsupported_parameter")
            if check is None and name not in IGNORED_FIELDS and name not in self._warned_fields:
                self._warned_fields.add(name)
                logger.warning("ignoring unknown request field %r (logged once per field)", name)
        return req

    def check_model(self, name: str | None) -> str:
        """The model name to report; 404 for a name this server does not serve."""
        if name is None or name in self.settings.served_model_names:
            return self.settings.model_name
        raise APIError(404, f"The model `{name}` does not exist. This server serves "
                       f"{', '.join(map(repr, self.settings.served_model_names))}.",
                       param="model", code="model_not_found")

    def check_request(self, req: SamplingFields) -> str:
        """The checks every generating endpoint starts with; returns the model name to report."""
        model = self.check_model(req.model)
        if not self.engine.is_alive:
            raise unavailable("The engine is not running.", code="engine_dead")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
        if not 1 <= req.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}.", param="n")
        return model

    def check_num_logprobs(self, value: int | None, param: str) -> None:
        limit = self.settings.max_logprobs
        if value is not None and not 0 <= value <= limit:
            raise bad_request(f"{param} must be between 0 and {limit}, got {value}.", param=param)

    # ---- tokens ----------------------------------------------------------------------------

    def resolve_max_tokens(self, num_prompt: int, max_tokens: int | None, kind: str, param: str) -> int:
        """The request's max_tokens checked against the context; None -> all the room left.

        Args:
            kind: "prompt" or "messages", for the error message.
            param: the field that set max_tokens.
        """
        limit = self.max_model_len
        if num_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your {kind} "
                f"resulted in {num_prompt} tokens; at least one token must remain for the "
                f"completion. Please reduce the length of the {kind}.",
                param=kind, code="context_length_exceeded")
        if max_tokens is None:
            return limit - num_prompt
        if max_tokens >= 0 and num_prompt + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the {kind}, {max_tokens} in the "
                f"completion). Please reduce the length of the {kind} or completion.",
                param=param, code="context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: SamplingFields, **overrides: Any) -> SamplingParams:
        """SamplingParams from the request's fields; 400 naming the parameter if invalid.

        Args:
            **overrides: fields each endpoint decides itself (max_tokens, logprobs, ...).
        """
        def pick(name: str, default: Any) -> Any:
            value = getattr(req, name)
            return self.defaults.get(name, default) if value is None else value

        try:
            return SamplingParams(
                n=req.n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                repetition_penalty=pick("repetition_penalty", 1.0),
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                seed=req.seed,
                min_tokens=req.min_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                skip_special_tokens=req.skip_special_tokens,
                **overrides,
            )
        except ValueError as e:
            raise from_value_error(e) from None

    def validate_prompt(self, prompt_token_ids: list[int], param: str) -> None:
        try:
            self.engine.validate(prompt_token_ids)
        except ValueError as e:
            raise bad_request(str(e), param=param) from None

    # ---- engine ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        engine_request_id: str,
        prompt: str | None,
        reservation: Reservation,
    ) -> AsyncIterator[RequestOutput]:
        """The engine's delta outputs for one prompt, with admission and abort bookkeeping."""
        finished = False
        try:
            stream = self.engine.generate(prompt_token_ids, params, engine_request_id, prompt)
            async with aclosing(stream):
                async for out in stream:
                    finished = out.finished
                    yield out
        except EngineDeadError as e:
            raise unavailable(f"The engine stopped: {e}", code="engine_dead") from None
        except ValueError as e:
            raise from_value_error(e, "prompt") from None
        finally:
            reservation.release(params.n)
            if not finished:
                self.metrics.record_abort(engine_request_id, params.n)

    # ---- responses -------------------------------------------------------------------------

    async def full_response(self, raw_request: Request, body: Awaitable[ResponseBase], start: float,
                            reservation: Reservation) -> Response:
        """A non-streaming response: await `body` unless the client leaves first (499)."""
        async def respond() -> Response:
            done = await body
            self.log_request(raw_request, done.id, done.usage, [c.finish_reason for c in done.choices], start)
            return Response(done.model_dump_json(), media_type="application/json")

        try:
            return await run_until_disconnect(raw_request, respond())
        finally:
            reservation.release_all()

    def stream_response(self, raw_request: Request, req: SamplingFields, writer: ChunkWriter,
                        events: AsyncIterator[str], num_prompt: int, start: float,
                        reservation: Reservation) -> SSEResponse:
        """A streaming response: the handler's `events`, the usage event if asked, [DONE]."""
        body = self._sse_body(raw_request, req, writer, events, num_prompt, start)
        return SSEResponse(body, on_close=reservation.release_all)

    async def _sse_body(self, raw_request: Request, req: SamplingFields, writer: ChunkWriter,
                        events: AsyncIterator[str], num_prompt: int, start: float) -> AsyncIterator[str]:
        # The 200 status line went out before the first event, so an error can only be told
        # as one last event.
        try:
            async with aclosing(events):
                async for event in events:
                    yield event
            usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=writer.num_completion_tokens)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield writer.usage_event(usage)
            self.log_request(raw_request, writer.request_id, usage, list(writer.finish_reasons.values()), start)
        except APIError as e:
            yield sse_event(e.body())
        except Exception:
            logger.exception("%s failed while streaming", writer.request_id)
            yield sse_event(error_body(f"Internal server error while streaming {writer.request_id}; "
                                       "see the server log.", "server_error", code="internal_error"))
        yield SSE_DONE

    def log_request(self, raw_request: Request, request_id: str, usage: UsageInfo,
                    finish_reasons: list[str | None], start: float) -> None:
        if self.settings.log_requests:
            logger.info("%s (x-request-id %s): %d prompt + %d completion tokens, finish=%s, %.3f s",
                        request_id, getattr(raw_request.state, "request_id", "-"), usage.prompt_tokens,
                        usage.completion_tokens, ",".join(str(r) for r in finish_reasons),
                        time.monotonic() - start)
