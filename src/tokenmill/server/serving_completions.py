"""POST /v1/completions: text or token-id prompts, n samples each, streaming or not,
logprobs and echo (echo + logprobs + max_tokens=0 scores a prompt, as lm-eval does)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, bad_request, error_body
from tokenmill.server.logprobs import completion_logprobs
from tokenmill.server.protocol import (
    UNSUPPORTED_COMPLETION,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from tokenmill.server.serving_engine import OpenAIServing, SampleState
from tokenmill.server.streaming import (
    SSE_DONE,
    SSEResponse,
    merge_streams,
    run_until_disconnect,
    sse_event,
)

logger = logging.getLogger("tokenmill.server")


@dataclass
class _Prompt:
    text: str | None  # None for token-id prompts until echo needs it
    token_ids: list[int]
    params: SamplingParams | None = None


class ServingCompletion(OpenAIServing):
    async def create(self, raw_request: Request) -> Response:
        start = time.monotonic()
        req = await self.parse(raw_request, CompletionRequest, UNSUPPORTED_COMPLETION)
        model = self.check_model(req.model)
        self.check_engine()
        self.check_common(req)
        self.check_num_logprobs(req.logprobs, "logprobs")
        prompts = await self._tokenize(req)
        for p in prompts:
            max_tokens = self.resolve_max_tokens(len(p.token_ids), req.max_tokens, "prompt", "max_tokens")
            p.params = self.sampling_params(
                req, max_tokens=max_tokens, logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo else None,
            )
            self.validate_prompt(p.token_ids, p.params, "prompt")
            if req.echo and p.text is None:
                p.text = self.tokenizer.decode(p.token_ids, skip_special_tokens=False)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        reservation = self.reserve(req.n * len(prompts))
        for p in prompts:
            self.metrics.record_params(req.n, p.params.max_tokens)
        streams = [
            self.generate(p.token_ids, p.params, f"{request_id}-{i}", p.text, reservation)
            for i, p in enumerate(prompts)
        ]
        created = int(time.time())
        if req.stream:
            gen = self._stream(raw_request, req, request_id, model, created, prompts, streams, start)
            return SSEResponse(gen, on_close=reservation.release_all)
        try:
            return await run_until_disconnect(
                raw_request, self._full(raw_request, req, request_id, model, created, prompts, streams, start))
        finally:
            reservation.release_all()

    async def _tokenize(self, req: CompletionRequest) -> list[_Prompt]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise bad_request("prompt must not be empty.", param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(_Prompt(item, await self.encode(item, req.add_special_tokens)))
            else:
                out.append(_Prompt(None, list(item)))
        return out

    # ---- non-streaming -------------------------------------------------------------------

    async def _full(self, raw_request: Request, req: CompletionRequest, request_id: str, model: str,
                    created: int, prompts: list[_Prompt], streams: list, start: float) -> Response:
        n = req.n
        samples = [[SampleState() for _ in range(n)] for _ in prompts]
        prompt_logprobs: list = [None] * len(prompts)
        async with aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                prompt_logprobs[i] = out.prompt_logprobs
                for o in out.outputs:
                    samples[i][o.index].add(o)
        choices = []
        for i, p in enumerate(prompts):
            for s_index, s in enumerate(samples[i]):
                text, logprobs = s.text, None
                if req.logprobs is not None:
                    logprobs = CompletionLogProbs()
                    if req.echo:
                        completion_logprobs(self.tokenizer, p.token_ids, prompt_logprobs[i] or [],
                                            req.logprobs, out=logprobs, text=p.text)
                    offset = len(p.text) if req.echo else 0
                    completion_logprobs(self.tokenizer, s.token_ids, s.logprobs, req.logprobs,
                                        initial_offset=offset, out=logprobs)
                if req.echo:
                    text = p.text + text
                choices.append(CompletionChoice(index=i * n + s_index, text=text, logprobs=logprobs,
                                                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        num_prompt = sum(len(p.token_ids) for p in prompts)
        num_completion = sum(len(s.token_ids) for row in samples for s in row)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                          total_tokens=num_prompt + num_completion)
        self.log_request(raw_request, request_id, num_prompt, num_completion,
                         [c.finish_reason for c in choices], time.monotonic() - start)
        body = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
        return Response(body.model_dump_json(), media_type="application/json")

    # ---- streaming -----------------------------------------------------------------------

    async def _stream(self, raw_request: Request, req: CompletionRequest, request_id: str, model: str,
                      created: int, prompts: list[_Prompt], streams: list,
                      start: float) -> AsyncIterator[str]:
        n = req.n
        # Characters sent so far per choice: text_offset continues from there.
        num_chars_sent = [0] * (len(prompts) * n)
        echo_pending = set(range(len(prompts) * n)) if req.echo else set()
        num_completion = 0
        finish_reasons: dict[int, str | None] = {}
        try:
            async with aclosing(merge_streams(streams)) as merged:
                async for i, out in merged:
                    for o in out.outputs:
                        index = i * n + o.index
                        chunk = self._chunk(req, prompts[i], out, o, index, index in echo_pending,
                                            num_chars_sent[index])
                        if chunk is None:
                            continue
                        echo_pending.discard(index)
                        num_chars_sent[index] += len(chunk.text)
                        num_completion += len(o.token_ids)
                        if o.finish_reason is not None:
                            finish_reasons[index] = o.finish_reason
                        yield sse_event(CompletionResponse(id=request_id, created=created, model=model,
                                                           choices=[chunk]))
            if req.stream_options is not None and req.stream_options.include_usage:
                num_prompt = sum(len(p.token_ids) for p in prompts)
                usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                                  total_tokens=num_prompt + num_completion)
                yield sse_event(CompletionResponse(id=request_id, created=created, model=model,
                                                   choices=[], usage=usage))
            self.log_request(raw_request, request_id, sum(len(p.token_ids) for p in prompts),
                             num_completion, list(finish_reasons.values()), time.monotonic() - start)
        except APIError as e:
            yield sse_event(e.body())
        except Exception:
            logger.exception("%s failed while streaming", request_id)
            yield sse_event(error_body(f"Internal server error while streaming {request_id}; "
                                       "see the server log.", "server_error", code="internal_error"))
        yield SSE_DONE

    def _chunk(self, req: CompletionRequest, prompt: _Prompt, out: RequestOutput, o, index: int,
               echo_now: bool, num_chars_sent: int) -> CompletionChoice | None:
        """The choice delta for one sample's output, or None if there is nothing to send."""
        text = o.text
        logprobs = CompletionLogProbs() if req.logprobs is not None else None
        if echo_now:
            prompt_lps = out.prompt_logprobs
            if logprobs is not None and (prompt_lps is None or len(prompt_lps) < len(prompt.token_ids)):
                return None  # still prefilling: echo once every prompt position is scored
            if logprobs is not None:
                completion_logprobs(self.tokenizer, prompt.token_ids, prompt_lps, req.logprobs,
                                    out=logprobs, text=prompt.text)
            text = prompt.text + text
        elif not text and not o.token_ids and o.finish_reason is None:
            return None
        if logprobs is not None:
            offset = num_chars_sent + (len(prompt.text) if echo_now else 0)
            completion_logprobs(self.tokenizer, o.token_ids, o.logprobs or [], req.logprobs,
                                initial_offset=offset, out=logprobs)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=o.finish_reason, stop_reason=o.stop_reason)
