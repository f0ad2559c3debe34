"""`--otlp-traces-endpoint`: OpenTelemetry traces of requests, exported as vLLM exports them.

This module is the switch: it imports no OpenTelemetry itself, so a server started without
the flag loads none (OpenTelemetry is an optional dependency, the `otel` extra). With the
flag, otel_tracer.py makes the spans and an OTLP exporter sends them: over gRPC unless
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or OTEL_EXPORTER_OTLP_PROTOCOL) says `http/protobuf`,
vLLM's and OpenTelemetry's default and variable. The exporters' other variables (headers,
certificates, timeout, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*) apply.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from tokenmill.server.otel_tracer import OTelTracer

PROTOCOL_ENV_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
DEFAULT_PROTOCOL = "grpc"
# The module of each protocol's span exporter (the `otel` extra installs both).
EXPORTER_MODULES = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}
INSTALL_HINT = "pip install 'tokenmill[otel]'"
# OTLP/HTTP receivers take traces at this path; the flag names the traces endpoint itself.
HTTP_TRACES_PATH = "/v1/traces"


class TracingUnavailable(ValueError):
    """--otlp-traces-endpoint was given but cannot work (packages missing, unknown protocol)."""


def otlp_protocol() -> str:
    """The OTLP transport the environment asks for; TracingUnavailable for one not supported."""
    for name in PROTOCOL_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            if value not in EXPORTER_MODULES:
                raise TracingUnavailable(f"{name}={value!r} is not supported; use one of "
                                         f"{', '.join(EXPORTER_MODULES)}.")
            return value
    return DEFAULT_PROTOCOL


def traces_endpoint(url: str, protocol: str) -> str:
    """The URL the exporter is given. OTLP/HTTP receivers listen at /v1/traces: a bare
    `http://host:4318` gets that path (the gRPC exporter takes host:port, any path ignored)."""
    if protocol == "http/protobuf" and urlparse(url).path in ("", "/"):
        return url.rstrip("/") + HTTP_TRACES_PATH
    return url


def require_tracing() -> str:
    """Check that tracing can start (a clear error naming the pip command if not), before
    the model is loaded. Returns the protocol."""
    protocol = otlp_protocol()
    try:
        importlib.import_module("tokenmill.server.otel_tracer")
        importlib.import_module(EXPORTER_MODULES[protocol])
    except ImportError as e:
        missing = f" ({e.name} is not installed)" if e.name else ""
        raise TracingUnavailable(f"--otlp-traces-endpoint needs OpenTelemetry's SDK and OTLP exporter{missing}: "
                                 f"{INSTALL_HINT}") from None
    return protocol


def create_tracer(url: str, model_name: str) -> OTelTracer:
    """The tracer exporting to `url`, with a batching span processor (spans leave on a
    background thread, in batches; `shutdown()` sends what is left)."""
    protocol = require_tracing()
    from tokenmill.server.otel_tracer import OTelTracer, span_exporter

    return OTelTracer(span_exporter(traces_endpoint(url, protocol), protocol), model_name)
