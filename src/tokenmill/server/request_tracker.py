"""RequestTracker: follows each engine request from the moment a handler hands it to the
engine until it ends, then reports it once, as a `FinishedRequest`, to the HTTP request's
context (for its log record) and to the tracer (one span per engine request).

It is an AsyncLLM observer, like the metrics: RequestTimes reach only observers, and the
handlers see just the outputs. Event loop only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.engine.async_llm import RequestTimes
from tokenmill.engine.output_processor import PhaseTimes
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.request_context import RequestContext, current_request

logger = logging.getLogger("tokenmill.server")


@dataclass(frozen=True)
class FinishedRequest(PhaseTimes):
    """One engine request (one prompt, all its n samples) once it has ended.

    Times are time.monotonic() seconds, as in RequestTimes; None for a milestone the request
    never reached (aborted while queued: no first_scheduled).
    """

    engine_request_id: str  # the id the handler gave the engine (e.g. cmpl-<hex>-0, chatcmpl-<hex>)
    params: SamplingParams
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens the prefix cache held, not computed
    num_completion_tokens: int  # over all samples, as the response's usage counts them
    finish_reasons: tuple[str, ...]  # by sample index; "abort" for a sample cut short
    arrival: float  # the engine front end took it
    first_scheduled: float | None
    first_token: float | None
    last_token: float | None
    finished: float


class RequestExporter(Protocol):
    """Where finished requests go besides the log (tracing.py's tracer)."""

    def export(self, request: FinishedRequest, ctx: RequestContext | None) -> str | None:
        """Record `request`; returns the trace id (32 hex digits) it went to, if any."""
        ...


@dataclass
class _Tracked:
    params: SamplingParams
    num_prompt_tokens: int
    ctx: RequestContext | None
    registered: float  # stands in for the arrival of a request the engine never reported
    times: RequestTimes | None = None  # the engine's, updated in place as it runs
    num_cached_tokens: int = 0
    num_completion_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)


class RequestTracker:
    def __init__(self, exporter: RequestExporter | None = None) -> None:
        self._exporter = exporter
        self._live: dict[str, _Tracked] = {}

    def register(self, engine_request_id: str, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Follow an engine request about to be submitted, for the current HTTP request."""
        self._live[engine_request_id] = _Tracked(params, num_prompt_tokens, current_request(), time.monotonic())

    def on_output(self, out: RequestOutput, times: RequestTimes) -> None:
        """AsyncLLM observer: one delivered (delta) output."""
        tracked = self._live.get(out.request_id)
        if tracked is None:
            return
        tracked.times = times
        tracked.num_cached_tokens = out.num_cached_tokens
        for o in out.outputs:
            tracked.num_completion_tokens += len(o.token_ids)
            if o.finish_reason is not None:
                tracked.finish_reasons[o.index] = o.finish_reason
        if out.finished:
            self._end(out.request_id, tracked, times.finished or time.monotonic())

    def on_abort(self, engine_request_id: str) -> None:
        """The request ended before finishing (client gone, drain, engine stopped)."""
        tracked = self._live.get(engine_request_id)
        if tracked is not None:
            self._end(engine_request_id, tracked, time.monotonic())

    def _end(self, engine_request_id: str, t: _Tracked, finished: float) -> None:
        del self._live[engine_request_id]
        times = t.times or RequestTimes(t.registered)
        record = FinishedRequest(
            engine_request_id=engine_request_id, params=t.params, num_prompt_tokens=t.num_prompt_tokens,
            num_cached_tokens=t.num_cached_tokens, num_completion_tokens=t.num_completion_tokens,
            finish_reasons=tuple(t.finish_reasons.get(i, "abort") for i in range(t.params.n)),
            arrival=times.arrival, first_scheduled=times.first_scheduled, first_token=times.first_token,
            last_token=times.last_token, finished=finished)
        if t.ctx is not None:
            t.ctx.finished.append(record)
        if self._exporter is None:
            return
        try:
            trace_id = self._exporter.export(record, t.ctx)
        except Exception:  # an observer's error would stop every request's delivery
            logger.exception("could not export the trace of %s", engine_request_id)
            return
        if t.ctx is not None and t.ctx.trace_id is None:
            t.ctx.trace_id = trace_id
