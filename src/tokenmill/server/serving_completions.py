"""POST /v1/completions: text or token-id prompts, n samples each, streaming or not,
logprobs and echo (echo + logprobs + max_tokens=0 scores a prompt, as lm-eval does)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.logprobs import completion_logprobs
from tokenmill.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from tokenmill.server.responses import SampleState
from tokenmill.server.serving_engine import OpenAIServing
from tokenmill.server.streaming import ChunkWriter, merge_streams
from tokenmill.server.unsupported import UNSUPPORTED_COMPLETION


@dataclass
class _Prompt:
    text: str | None  # None for token-id prompts until echo needs it
    token_ids: list[int]
    params: SamplingParams | None = None


class ServingCompletion(OpenAIServing):
    async def create(self, raw_request: Request) -> Response:
        start = time.monotonic()
        req = await self.parse(raw_request, CompletionRequest, UNSUPPORTED_COMPLETION)
        model = self.check_request(req)
        self.check_num_logprobs(req.logprobs, "logprobs")
        # Token texts, the prompt's text, text to match: all need the tokenizer.
        for param, used in (("logprobs", req.logprobs is not None), ("echo", req.echo), ("stop", req.stop)):
            if used:
                self.require_tokenizer(param)
        prompts = await self._tokenize(req)
        for p in prompts:
            max_tokens = self.resolve_max_tokens(len(p.token_ids), req.max_tokens, "prompt", "max_tokens")
            p.params = await self.sampling_params(
                req, max_tokens=max_tokens, logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo else None,
            )
            self.validate_prompt(p.token_ids, "prompt")
            if req.echo and p.text is None:
                p.text = self.tokenizer.decode(p.token_ids, skip_special_tokens=False)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        reservation = self.admission.reserve(req.n * len(prompts))
        for p in prompts:
            self.metrics.record_params(req.n, p.params.max_tokens)
        streams = [
            self.generate(p.token_ids, p.params, f"{request_id}-{i}", p.text, reservation)
            for i, p in enumerate(prompts)
        ]
        envelope = {"id": request_id, "created": int(time.time()), "model": model}
        num_prompt = sum(len(p.token_ids) for p in prompts)
        if req.stream:
            prompt_tokens = [len(p.token_ids) for p in prompts for _ in range(req.n)]
            writer = self.chunk_writer(req, CompletionResponse(**envelope, choices=[]), prompt_tokens)
            return self.stream_response(raw_request, req, writer, self._events(req, writer, prompts, streams),
                                        num_prompt, start, reservation)
        body = self._full(req, envelope, num_prompt, prompts, streams)
        return await self.full_response(raw_request, request_id, body, start, reservation)

    async def _tokenize(self, req: CompletionRequest) -> list[_Prompt]:
        # (the validator has refused empty prompts)
        prompt = req.prompt
        items: list = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
        # Before any tokenizing: a batch that can never be admitted costs nothing.
        self.admission.check_size(req.n * len(items))
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(_Prompt(item, await self.encode_prompt(item, req.add_special_tokens, "prompt")))
            else:
                out.append(_Prompt(None, list(item)))
        return out

    # ---- non-streaming -------------------------------------------------------------------

    async def _full(self, req: CompletionRequest, envelope: dict[str, Any], num_prompt: int,
                    prompts: list[_Prompt], streams: list[AsyncIterator[RequestOutput]]) -> CompletionResponse:
        n = req.n
        samples = [[SampleState() for _ in range(n)] for _ in prompts]
        prompt_logprobs: list = [None] * len(prompts)
        async with aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                prompt_logprobs[i] = out.prompt_logprobs
                for o in out.outputs:
                    samples[i][o.index].add(o)
        choices = [self._full_choice(req, p, prompt_logprobs[i], s, i * n + s_index)
                   for i, p in enumerate(prompts) for s_index, s in enumerate(samples[i])]
        num_completion = sum(len(s.token_ids) for row in samples for s in row)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion)
        return CompletionResponse(**envelope, choices=choices, usage=usage)

    def _full_choice(self, req: CompletionRequest, prompt: _Prompt, prompt_logprobs: list | None,
                     sample: SampleState, index: int) -> CompletionChoice:
        logprobs = None
        if req.logprobs is not None:
            logprobs = CompletionLogProbs()
            if req.echo:
                completion_logprobs(self.tokenizer, prompt.token_ids, prompt_logprobs or [], req.logprobs,
                                    out=logprobs, text=prompt.text)
            offset = len(prompt.text) if req.echo else 0
            completion_logprobs(self.tokenizer, sample.token_ids, sample.logprobs, req.logprobs,
                                initial_offset=offset, out=logprobs)
        text = prompt.text + sample.text if req.echo else sample.text
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=sample.finish_reason, stop_reason=sample.stop_reason)

    # ---- streaming -----------------------------------------------------------------------

    async def _events(self, req: CompletionRequest, writer: ChunkWriter, prompts: list[_Prompt],
                      streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        n = req.n
        # Characters sent so far per choice: text_offset continues from there.
        num_chars_sent = [0] * (len(prompts) * n)
        echo_pending = set(range(len(prompts) * n)) if req.echo else set()
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
                    yield writer.choice_event(chunk, o)

    def _chunk(self, req: CompletionRequest, prompt: _Prompt, out: RequestOutput, o: CompletionOutput, index: int,
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
