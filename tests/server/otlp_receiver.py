"""A real OTLP trace receiver on loopback, for the tracing tests: the TraceService of
OpenTelemetry's own protocol definitions (the `opentelemetry-proto` package), over gRPC or
over HTTP with protobuf bodies, as a collector, Jaeger or Tempo would run it. It keeps the
spans it was sent, flattened into `ReceivedSpan`s.
"""

from __future__ import annotations

import gzip
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
HTTP_TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service_name: str


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(ReceivedSpan(
                    name=s.name, kind=s.kind, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano, attributes={a.key: _value(a.value) for a in s.attributes},
                    service_name=str(resource.get("service.name", ""))))
    return out


class OTLPReceiver:
    """Start with `OTLPReceiver.grpc()` or `.http()`, as a context manager; `url` is what
    `--otlp-traces-endpoint` takes."""

    def __init__(self) -> None:
        self.url = ""
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._stop = lambda: None

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self._spans.extend(_flatten(request))

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for_spans(self, predicate, timeout_s: float) -> list[ReceivedSpan]:
        """The spans once `predicate(spans)` holds; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not predicate(spans := self.spans):
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver did not get the expected spans; it has {spans}")
            time.sleep(0.05)
        return spans

    @classmethod
    def grpc(cls) -> OTLPReceiver:
        receiver = cls()

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (the protocol's name)
                receiver._receive(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        receiver.url = f"http://127.0.0.1:{port}"
        receiver._stop = lambda: server.stop(grace=None)
        return receiver

    @classmethod
    def http(cls) -> OTLPReceiver:
        receiver = cls()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != HTTP_TRACES_PATH or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_error(404 if self.path != HTTP_TRACES_PATH else 415)
                    return
                receiver._receive(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        receiver.url = f"http://127.0.0.1:{server.server_address[1]}"

        def stop() -> None:
            server.shutdown()
            server.server_close()

        receiver._stop = stop
        return receiver

    def __enter__(self) -> OTLPReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
