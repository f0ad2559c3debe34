"""What every OpenAI handler shares: body parsing, model check, tokenization, sampling
params, context-length check, the engine stream; the response tails are in responses.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from tokenmill.engine.async_llm import AsyncLLM, EngineDeadError
from tokenmill.engine.llm import default_sampling_params
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.admission import Admission, Reservation
from tokenmill.server.args import ServerSettings
from tokenmill.server.drain import DrainAborted
from tokenmill.server.errors import (
    APIError,
    bad_request,
    from_validation_error,
    from_value_error,
    unavailable,
)
from tokenmill.server.limits import RequestLimits
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.prompt_encoder import PromptEncoder
from tokenmill.server.protocol import OpenAIBaseModel, SamplingFields
from tokenmill.server.request_tracker import RequestTracker
from tokenmill.server.responses import ResponseWriter
from tokenmill.server.streaming import STATUS_CLIENT_CLOSED, run_until_disconnect
from tokenmill.server.structured import STRUCTURED_FIELDS, structured_outputs_from
from tokenmill.server.unsupported import IGNORED_FIELDS, Unsupported
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill.server")

M = TypeVar("M", bound=OpenAIBaseModel)

MAX_WARNED_FIELDS = 100


class OpenAIServing(ResponseWriter):
    def __init__(self, engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics,
                 admission: Admission, encoder: PromptEncoder, limits: RequestLimits,
                 tracker: RequestTracker | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        self._encoder = encoder
        self.limits = limits
        self.tracker = tracker  # None: neither request logs nor traces
        self.max_model_len = engine.config.scheduler.max_model_len
        # The checkpoint's generation_config.json defaults apply when a field is not sent.
        self.defaults = default_sampling_params(engine.config.model_path)
        self._warned_fields: set[str] = set()

    # ---- request parsing -------------------------------------------------------------------

    @staticmethod
    async def handle(raw_request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
        """Run a POST handler until its client leaves: then the handler is cancelled wherever
        it is (tokenizing, waiting for the engine) and the answer is 499."""
        try:
            await raw_request.body()  # read (and size-checked) first: the watcher reads what follows
        except ClientDisconnect:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        return await run_until_disconnect(raw_request, handler(raw_request))

    async def parse(self, raw_request: Request, model_cls: type[M], unsupported: Unsupported) -> M:
        """Read the JSON body into `model_cls`; 400 for malformed JSON, bad fields, and
        features that are not implemented."""
        data = self.limits.parse_json(await raw_request.body())
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
            if check is None and name not in IGNORED_FIELDS | STRUCTURED_FIELDS and name not in self._warned_fields:
                self._warn_unknown_field(name)
        return req

    def _warn_unknown_field(self, name: str) -> None:
        # Bounded: a client inventing a new name per request must not grow memory or the log.
        if len(self._warned_fields) < MAX_WARNED_FIELDS:
            self._warned_fields.add(name)
            logger.warning("ignoring unknown request field %r (logged once per field)", name)
        elif len(self._warned_fields) == MAX_WARNED_FIELDS:
            self._warned_fields.add(name)
            logger.warning("more than %d distinct unknown request fields: no longer logged", MAX_WARNED_FIELDS)

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
        return model

    def check_num_logprobs(self, value: int | None, param: str) -> None:
        limit = self.settings.max_logprobs
        if value is not None and not 0 <= value <= limit:
            raise bad_request(f"{param} must be between 0 and {limit}, got {value}.", param=param)

    # ---- tokens ----------------------------------------------------------------------------

    def require_tokenizer(self, param: str) -> Tokenizer:
        """The tokenizer; 400 naming `param` when the server runs without one."""
        if self.tokenizer is None:
            raise bad_request(f"'{param}' needs the tokenizer, which this server skipped "
                              "(--skip-tokenizer-init); send prompts as token ids.", param=param)
        return self.tokenizer

    async def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        self.require_tokenizer(param)
        return await self._encoder.encode(text, add_special_tokens)

    async def encode_prompt(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of a prompt for generation: 400 before tokenizing one too long to fit."""
        self.require_tokenizer(param)
        self.limits.check_prompt_chars(text, param)
        return await self.encode(text, add_special_tokens, param)

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

    async def sampling_params(self, req: SamplingFields, **overrides: Any) -> SamplingParams:
        """SamplingParams from the request's fields; 400 naming the parameter if invalid.

        Args:
            **overrides: fields each endpoint decides itself (max_tokens, logprobs, ...).
        """
        if "structured_outputs" not in overrides:  # chat with tools sets its own
            overrides["structured_outputs"] = structured_outputs_from(req.model_extra or {})

        def pick(name: str, default: Any) -> Any:
            value = getattr(req, name)
            return self.defaults.get(name, default) if value is None else value

        try:
            params = SamplingParams(
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
            await self.engine.check_structured_outputs(params)  # compiles now: a bad grammar is a 400 here
            return params
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
        if self.tracker is not None:
            self.tracker.register(engine_request_id, len(prompt_token_ids), params)
        try:
            stream = self.engine.generate(prompt_token_ids, params, engine_request_id, prompt)
            async with aclosing(stream):
                async for out in stream:
                    finished = out.finished
                    yield out
        except EngineDeadError as e:
            raise unavailable(f"The engine stopped: {e}", code="engine_dead") from None
        except DrainAborted as e:
            logger.warning("%s aborted while draining: %s", engine_request_id, e.reason)
            raise unavailable(str(e), code="shutting_down") from None
        except ValueError as e:
            raise from_value_error(e, "prompt") from None
        finally:
            reservation.release(params.n)
            if not finished:
                self.metrics.record_abort(engine_request_id, params.n)
                if self.tracker is not None:
                    self.tracker.on_abort(engine_request_id)
