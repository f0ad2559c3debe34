"""The spans `--otlp-traces-endpoint` exports (loaded by tracing.py only with the flag).

One `llm_request` span of kind SERVER per engine request (one prompt with its n samples),
with vLLM's name and attributes, so its dashboards and queries work unchanged; and, which
vLLM does not have, one child span per phase: `queue` (arrival to first scheduled),
`prefill` (to the first token), `decode` (to the last token). The span is a child of the
caller's span when the request carried a W3C `traceparent`, else the root of a new trace.

Spans are made when the request ends, from the engine's RequestTimes (time.monotonic()),
so the phases have their real start and end; they are moved to wall-clock time here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import tokenmill
from tokenmill.server.request_context import RequestContext
from tokenmill.server.request_tracker import FinishedRequest

SPAN_NAME = "llm_request"  # vLLM's
PHASE_SPAN_NAMES = ("queue", "prefill", "decode")


class SpanAttributes:
    """vLLM's attribute names (GenAI semantic conventions, and its own where those have none)."""

    REQUEST_ID = "gen_ai.request.id"
    RESPONSE_MODEL = "gen_ai.response.model"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    REQUEST_TOP_P = "gen_ai.request.top_p"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_N = "gen_ai.request.n"
    RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    USAGE_CACHED_TOKENS = "gen_ai.usage.cached_tokens"
    LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    LATENCY_E2E = "gen_ai.latency.e2e"
    LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
    LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
    LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"
    # tokenmill's: the X-Request-Id the response carried, which the logs and the gateway use.
    X_REQUEST_ID = "tokenmill.x_request_id"


def span_exporter(endpoint: str, protocol: str) -> SpanExporter:
    """The OTLP span exporter of `protocol` ("grpc" or "http/protobuf") sending to `endpoint`."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Plaintext unless the URL is https:// (as vLLM; collectors listen so on 4317), or the
        # environment says otherwise, which the exporter then reads itself.
        tls_vars = ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE",
                    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
        insecure = None if any(os.environ.get(v) for v in tls_vars) else True
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(endpoint=endpoint)


def _resource() -> Resource:
    """OpenTelemetry's resource from the environment, named `tokenmill` unless it names one."""
    resource = Resource.create({SERVICE_VERSION: tokenmill.__version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "tokenmill"}))
    return resource


def _to_wall_clock_ns() -> Callable[[float], int]:
    """time.monotonic() seconds -> Unix epoch nanoseconds, as of now (re-read per request, so
    a wall clock stepped by NTP shifts only later spans)."""
    offset_ns = time.time_ns() - time.monotonic_ns()
    return lambda t: int(t * 1e9) + offset_ns


class OTelTracer:
    """Spans of finished requests onto a batching processor (RequestTracker's exporter)."""

    def __init__(self, exporter: SpanExporter, model_name: str) -> None:
        self._provider = TracerProvider(resource=_resource())  # this app's own, not the global one
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("tokenmill.server", tokenmill.__version__)
        self._propagator = TraceContextTextMapPropagator()
        self._model_name = model_name

    def export(self, request: FinishedRequest, ctx: RequestContext | None) -> str:
        """Make the request's spans (queued for export); returns their trace id."""
        # Over an empty context, not the ambient one: the parent is the caller's or none.
        parent = self._propagator.extract(ctx.trace_headers if ctx is not None else {}, context=Context())
        to_ns = _to_wall_clock_ns()
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER,
                                       start_time=to_ns(request.arrival), attributes=self._attributes(request, ctx))
        inside = trace.set_span_in_context(span)
        r = request
        for name, start, end in zip(PHASE_SPAN_NAMES, (r.arrival, r.first_scheduled, r.first_token),
                                    (r.first_scheduled, r.first_token, r.last_token)):
            if start is not None and end is not None:
                self._tracer.start_span(name, context=inside, start_time=to_ns(start)).end(end_time=to_ns(end))
        span.end(end_time=to_ns(request.finished))
        return format_trace_id(span.get_span_context().trace_id)

    def _attributes(self, r: FinishedRequest, ctx: RequestContext | None) -> dict:
        a = SpanAttributes
        attributes = {
            a.REQUEST_ID: r.engine_request_id,
            a.RESPONSE_MODEL: self._model_name,
            a.REQUEST_TEMPERATURE: r.params.temperature,
            a.REQUEST_TOP_P: r.params.top_p,
            a.REQUEST_MAX_TOKENS: r.params.max_tokens,
            a.REQUEST_N: r.params.n,
            a.RESPONSE_FINISH_REASONS: list(r.finish_reasons),
            a.USAGE_PROMPT_TOKENS: r.num_prompt_tokens,
            a.USAGE_COMPLETION_TOKENS: r.num_completion_tokens,
            a.USAGE_CACHED_TOKENS: r.num_cached_tokens,
            a.LATENCY_TIME_IN_QUEUE: r.queue_s,
            a.LATENCY_TIME_TO_FIRST_TOKEN: r.ttft_s,
            a.LATENCY_E2E: r.e2e_s,
            a.LATENCY_TIME_IN_MODEL_PREFILL: r.prefill_s,
            a.LATENCY_TIME_IN_MODEL_DECODE: r.decode_s,
            a.LATENCY_TIME_IN_MODEL_INFERENCE: r.inference_s,
            a.X_REQUEST_ID: ctx.request_id if ctx is not None else None,
        }
        # A phase the request never reached (aborted while queued) is left out, not None.
        return {name: value for name, value in attributes.items() if value is not None}

    def shutdown(self) -> None:
        """Send the spans still queued, then stop the export thread."""
        self._provider.shutdown()
