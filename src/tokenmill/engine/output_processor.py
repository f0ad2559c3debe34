"""OutputProcessor: turns the core's token ids into RequestOutputs (text, logprobs,
stop strings, n>1 aggregation). Shared by the offline LLM and the async server front end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import GrammarCompiler, StructuredOutputError
from tokenmill.tokenizer import Tokenizer


def child_request_id(request_id: str, index: int, n: int) -> str:
    """Engine-side id of sample `index` of a request (the request id itself when n == 1)."""
    return request_id if n == 1 else f"{index}_{request_id}"


def span_s(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


class PhaseTimes:
    """A request's phases from its milestones, as the metrics, logs and traces all define
    them (after vLLM): queue = waiting, prefill up to the first token, decode after it;
    inference = prefill + decode. None: a milestone the request never reached."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    last_token: float | None
    finished: float | None

    @property
    def end(self) -> float:
        return self.finished or self.last_token or self.arrival

    @property
    def queue_s(self) -> float | None:
        return span_s(self.arrival, self.first_scheduled)

    @property
    def ttft_s(self) -> float | None:
        return span_s(self.arrival, self.first_token)

    @property
    def prefill_s(self) -> float | None:
        return span_s(self.first_scheduled, self.first_token)

    @property
    def decode_s(self) -> float | None:
        return span_s(self.first_token, self.last_token)

    @property
    def inference_s(self) -> float | None:
        return span_s(self.first_scheduled, self.end)

    @property
    def e2e_s(self) -> float:
        return max(0.0, self.end - self.arrival)


@dataclass
class RequestTimes(PhaseTimes):
    """Wall-clock milestones of one request (time.monotonic seconds), for metrics."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each new-token batch arrived


@dataclass
class _Sample:
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer | NoDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # for delta outputs: tokens already handed out


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    delta: bool
    times: RequestTimes
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(
        self, tokenizer: Tokenizer | None, model_eos_token_ids: Iterable[int] = (), vocab_size: int | None = None
    ) -> None:
        """Args:
            tokenizer: the model's tokenizer (its eos ids include generation_config's);
                None (skip_tokenizer_init): token ids only, no text, no stop strings.
            model_eos_token_ids: eos ids from config.json, which may add to those.
            vocab_size: rows of the model's logits (structured output's token masks).
        """
        self.tokenizer = tokenizer
        self.eos_token_ids = set(tokenizer.eos_token_ids if tokenizer else ()) | set(model_eos_token_ids)
        self.vocab_size = vocab_size
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        self._grammars_lock = threading.Lock()  # compiles run on worker threads: build it once
        self._requests: dict[str, _RequestState] = {}
        self._children: dict[str, tuple[_RequestState, _Sample]] = {}

    def grammar(self, params: SamplingParams) -> Any:
        """The request's compiled grammar (a pristine llguidance matcher, cached by content;
        None without structured_outputs), or StructuredOutputError. Front ends call it to
        validate before queueing; add_request gives each sample a copy."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None or self.vocab_size is None:
            raise StructuredOutputError("structured output needs the tokenizer, which this engine skipped "
                                        "(skip_tokenizer_init).")
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.vocab_size,
                                                 sorted(self.eos_token_ids))
        return self._grammars.compiled(params.structured_outputs)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        delta: bool = False,
        arrival_time: float | None = None,
        grammar: Any = None,
    ) -> list[tuple[str, SamplingParams, Any]]:
        """Register a request; returns the (engine request id, params, grammar matcher or
        None) of each sample.

        Args:
            grammar: the request's compiled grammar when the caller already has it
                (`grammar(params)`); compiled here otherwise.

        Raises:
            ValueError: stop strings without a tokenizer (nothing to match them in).
            StructuredOutputError: a grammar that does not compile.
        """
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need the tokenizer, which this engine skipped (skip_tokenizer_init); "
                             "use stop_token_ids.")
        if grammar is None:
            grammar = self.grammar(params)
        params.all_stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        samples = []
        for i in range(params.n):
            child = params if params.n == 1 else params.clone_for_child(i)
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child) if self.tokenizer
                     else NoDetokenizer())
            samples.append(_Sample(i, child, detok))
            if child.logprobs is not None:
                samples[-1].logprobs, samples[-1].cumulative_logprob = [], 0.0
        state = _RequestState(
            request_id, prompt, prompt_token_ids, samples, delta, RequestTimes(arrival_time or time.monotonic())
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self._requests[request_id] = state
        ids = []
        for s in samples:
            cid = child_request_id(request_id, s.index, params.n)
            self._children[cid] = (state, s)
            # Each sample advances its own matcher.
            ids.append((cid, s.params, None if grammar is None else grammar.deep_copy()))
        return ids

    def engine_ids(self, request_id: str, state: _RequestState | None = None) -> list[str]:
        """Engine-side ids of a request's samples ([] for an unknown request)."""
        state = state or self._requests.get(request_id)
        if state is None:
            return []
        n = len(state.samples)
        return [child_request_id(request_id, s.index, n) for s in state.samples]

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Forget a request (client went away); returns its final output marked 'abort'."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for cid in self.engine_ids(request_id, state):
            self._children.pop(cid, None)
        for s in state.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        state.times.finished = time.monotonic()
        return self._make_output(state, changed=state.samples)

    def process_outputs(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[tuple[RequestOutput, RequestTimes]], list[str]]:
        """Apply one step's core outputs.

        Returns:
            (request outputs to deliver, engine request ids to abort in the core because a
            stop string finished them).
        """
        now = time.monotonic()
        touched: dict[str, tuple[_RequestState, list[_Sample]]] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self._children.get(out.request_id)
            if entry is None:
                continue  # aborted by the front end while this step ran
            state, sample = entry
            if sample.finish_reason is not None:
                continue  # finished by a stop string; the core's abort is on its way
            if state.times.first_scheduled is None:
                state.times.first_scheduled = out.first_scheduled_time
                state.num_cached_tokens = out.num_cached_tokens
            # Only sample 0 scores the prompt (SamplingParams.clone_for_child).
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(self._to_logprobs(x, sample) for x in out.new_prompt_logprobs)
            if out.new_token_ids:
                self._add_tokens(sample, out)
                state.times.first_token = state.times.first_token or now
                state.times.last_token = now
                state.times.token_times.append(now)
            if out.finish_reason is not None and sample.finish_reason is None:
                sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            elif sample.finish_reason is not None and out.finish_reason is None:
                to_abort.append(out.request_id)  # a stop string matched in the text
            touched.setdefault(state.request_id, (state, []))[1].append(sample)

        results = []
        for rid, (state, changed) in touched.items():
            if state.finished:
                state.times.finished = now
                del self._requests[rid]
                for cid in self.engine_ids(rid, state):
                    self._children.pop(cid, None)
            if state.delta or state.finished:
                results.append((self._make_output(state, changed), state.times))
        return results, to_abort

    # ------------------------------------------------------------------------------------
    def _add_tokens(self, sample: _Sample, out: EngineCoreOutput) -> None:
        num_new = len(out.new_token_ids)
        if num_new > 1 and sample.params.stop:
            # Several tokens in one step (speculative decoding): a stop string may complete
            # before the last one. The output ends at the token that completed it, as it
            # would have without speculation.
            for i in range(num_new):
                self._add_token_run(sample, out, i, i + 1)
                if sample.finish_reason is not None:
                    return
        else:
            self._add_token_run(sample, out, 0, num_new)

    def _add_token_run(self, sample: _Sample, out: EngineCoreOutput, start: int, end: int) -> None:
        """Add out.new_token_ids[start:end] (and their logprobs) to the sample."""
        new_ids = out.new_token_ids[start:end]
        sample.token_ids.extend(new_ids)
        if sample.logprobs is not None and out.new_logprobs:
            for lp in out.new_logprobs[start:end]:
                sample.logprobs.append(self._to_logprobs(lp, sample))
                sample.cumulative_logprob += lp.logprobs[0]
        # Ended on a stop token (eos or stop_token_ids), whose text is left out; a finished
        # grammar also ends with "stop", on a token that is part of the output.
        on_stop_token = (out.finish_reason == "stop" and bool(new_ids) and end == len(out.new_token_ids)
                         and new_ids[-1] in sample.params.all_stop_token_ids)
        stop = sample.detok.update(new_ids, stop_terminated=on_stop_token)
        if stop is not None:
            sample.finish_reason, sample.stop_reason = "stop", stop

    def _to_logprobs(self, lp, sample: _Sample) -> PositionLogprobs:
        return {
            tok: Logprob(logprob=val, rank=rank, decoded_token=sample.detok.decode_token(tok))
            for tok, val, rank in zip(lp.token_ids, lp.logprobs, lp.ranks)
        }

    def _make_output(self, state: _RequestState, changed: list[_Sample]) -> RequestOutput:
        outs = []
        samples = changed if state.delta else state.samples
        for s in sorted(samples, key=lambda x: x.index):
            finished = s.finish_reason is not None
            if state.delta:
                text = s.detok.get_delta_text(finished)
                token_ids = s.token_ids[s.sent_tokens :]
                logprobs = s.logprobs[s.sent_tokens :] if s.logprobs is not None else None
                s.sent_tokens = len(s.token_ids)
            else:
                text, token_ids, logprobs = s.detok.output_text, list(s.token_ids), s.logprobs
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outs,
            finished=state.finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
        )
