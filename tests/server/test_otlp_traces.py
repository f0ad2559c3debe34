"""`tokenmill serve --otlp-traces-endpoint`: a real server exporting to a real OTLP receiver
on loopback (gRPC, and HTTP/protobuf), driven by the official openai client as a traced
caller would: one `llm_request` span per engine request, a child of the caller's span, with
vLLM's attributes agreeing with the response's usage, and queue/prefill/decode spans laid
end to end inside it; the spans batched and flushed at shutdown; the JSON log's records
carrying the same trace ids; a request cut short traced up to its abort. Without the
packages the flag is a clear error, and without the flag no OpenTelemetry SDK is loaded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id
from otlp_receiver import SPAN_KIND_SERVER, OTLPReceiver, ReceivedSpan
from server_harness import CEILING_S, ServedProcess

from tokenmill.engine.async_llm import RequestTimes
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.otel_tracer import OTelTracer
from tokenmill.server.request_context import RequestContext, bind_request, unbind_request
from tokenmill.server.request_tracker import RequestTracker

MODEL = "m"
# Callers' spans, as their traceparent headers name them.
TRACE_A, PARENT_A = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACE_B, PARENT_B = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACE_C, PARENT_C = "5b8aa5a2d2c872e8321cf37308d69df2", "051581bf3cb55c13"
EXACT = {"ignore_eos": True}  # every request generates exactly max_tokens


def traceparent(trace_id: str, span_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{span_id}-01"}


def serve(model, *args: str) -> ServedProcess:
    return ServedProcess(model, "--dtype", "float32", "--kv-cache-memory", "64MiB", "--served-model-name", MODEL,
                         *args)


def client_of(served: ServedProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def otel_env(monkeypatch):
    """The server process inherits the environment: none of the runner's OTel settings."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME",
                 "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER", "OTEL_BSP_SCHEDULE_DELAY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def llm_spans(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """The llm_request spans by gen_ai.request.id (the engine request id)."""
    return {s.attributes["gen_ai.request.id"]: s for s in spans if s.name == "llm_request"}


def assert_phases(span: ReceivedSpan, spans: list[ReceivedSpan]) -> None:
    """queue, prefill, decode: children of `span`, end to end inside it, matching its attributes."""
    phases = {s.name: s for s in spans if s.parent_span_id == span.span_id}
    assert sorted(phases) == ["decode", "prefill", "queue"]
    queue, prefill, decode = phases["queue"], phases["prefill"], phases["decode"]
    assert {s.trace_id for s in phases.values()} == {span.trace_id}
    assert span.start_ns == queue.start_ns <= queue.end_ns == prefill.start_ns <= prefill.end_ns \
        == decode.start_ns <= decode.end_ns <= span.end_ns
    a = span.attributes

    def seconds(start_ns: int, end_ns: int) -> float:
        return pytest.approx((end_ns - start_ns) / 1e9, abs=1e-6)

    assert a["gen_ai.latency.time_in_queue"] == seconds(queue.start_ns, queue.end_ns)
    assert a["gen_ai.latency.time_in_model_prefill"] == seconds(prefill.start_ns, prefill.end_ns)
    assert a["gen_ai.latency.time_in_model_decode"] == seconds(decode.start_ns, decode.end_ns)
    assert a["gen_ai.latency.time_to_first_token"] == seconds(span.start_ns, prefill.end_ns)
    assert a["gen_ai.latency.e2e"] == seconds(span.start_ns, span.end_ns)
    assert a["gen_ai.latency.time_in_model_inference"] == seconds(prefill.start_ns, span.end_ns)


def test_each_request_is_a_span_in_its_callers_trace_with_its_phases(tiny_model, otel_env):
    # Far longer than the test: the spans can only arrive by the flush at shutdown.
    otel_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    with OTLPReceiver.grpc() as receiver:
        served = serve(tiny_model, "--otlp-traces-endpoint", receiver.url, "--log-format", "json")
        try:
            client = client_of(served)
            chat = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "ROMEO:"}], max_tokens=6, temperature=0.5,
                top_p=0.9, extra_body=EXACT,
                extra_headers={**traceparent(TRACE_A, PARENT_A), "x-request-id": "otel-chat"})
            chunks = list(client.completions.create(
                model=MODEL, prompt="JULIET:", max_tokens=5, stream=True, stream_options={"include_usage": True},
                extra_body=EXACT, extra_headers=traceparent(TRACE_B, PARENT_B)))
            batch = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET: O Romeo"], n=2, max_tokens=3,
                                              extra_body=EXACT, extra_headers=traceparent(TRACE_C, PARENT_C))
            untraced = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=2, extra_body=EXACT)
            assert receiver.spans == []  # batched, not sent one by one
            served.proc.send_signal(signal.SIGTERM)
            log = served.stop()
        finally:
            served.kill()
        spans = receiver.spans

    by_id = llm_spans(spans)
    stream_id, stream_usage = chunks[0].id, chunks[-1].usage
    assert sorted(by_id) == sorted([chat.id, f"{stream_id}-0", f"{batch.id}-0", f"{batch.id}-1", f"{untraced.id}-0"])
    assert len(spans) == 4 * len(by_id)  # and nothing else
    assert {s.service_name for s in spans} == {"tokenmill"}

    span = by_id[chat.id]
    assert (span.trace_id, span.parent_span_id, span.kind) == (TRACE_A, PARENT_A, SPAN_KIND_SERVER)
    a = span.attributes
    assert (a["gen_ai.usage.prompt_tokens"], a["gen_ai.usage.completion_tokens"]) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert a["gen_ai.request.temperature"] == pytest.approx(0.5) and a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.n"]) == (6, 1)
    assert a["gen_ai.response.model"] == MODEL and a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["tokenmill.x_request_id"] == "otel-chat"

    span = by_id[f"{stream_id}-0"]
    assert (span.trace_id, span.parent_span_id) == (TRACE_B, PARENT_B)
    assert (span.attributes["gen_ai.usage.prompt_tokens"], span.attributes["gen_ai.usage.completion_tokens"]) == (
        stream_usage.prompt_tokens, stream_usage.completion_tokens)

    # One span per prompt, both children of the caller's span; n=2 samples in each.
    prompts = [by_id[f"{batch.id}-{i}"] for i in range(2)]
    assert {(s.trace_id, s.parent_span_id) for s in prompts} == {(TRACE_C, PARENT_C)}
    assert sum(s.attributes["gen_ai.usage.prompt_tokens"] for s in prompts) == batch.usage.prompt_tokens
    assert sum(s.attributes["gen_ai.usage.completion_tokens"] for s in prompts) == batch.usage.completion_tokens
    assert {s.attributes["gen_ai.request.n"] for s in prompts} == {2}

    # No traceparent: the root of a trace of its own.
    span = by_id[f"{untraced.id}-0"]
    assert span.parent_span_id == "" and span.trace_id not in (TRACE_A, TRACE_B, TRACE_C)

    for span in by_id.values():
        assert_phases(span, spans)

    # The log's finished records name the same traces.
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    finished = {r["response_id"]: r for r in records if "response_id" in r}
    assert (finished[chat.id]["trace_id"], finished[chat.id]["request_id"]) == (TRACE_A, "otel-chat")
    assert finished[stream_id]["trace_id"] == TRACE_B and finished[batch.id]["trace_id"] == TRACE_C
    assert finished[untraced.id]["trace_id"] == by_id[f"{untraced.id}-0"].trace_id


def test_http_protobuf_exports_while_serving(tiny_model, otel_env):
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    otel_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    otel_env.setenv("OTEL_SERVICE_NAME", "tokenmill-under-test")
    # A bare host:port, as for a collector's 4318: the server adds /v1/traces.
    with OTLPReceiver.http() as receiver, serve(tiny_model, "--otlp-traces-endpoint", receiver.url) as served:
        out = client_of(served).completions.create(model=MODEL, prompt="ROMEO:", max_tokens=3, extra_body=EXACT,
                                                   extra_headers=traceparent(TRACE_A, PARENT_A))
        spans = receiver.wait_for_spans(lambda s: f"{out.id}-0" in llm_spans(s) and len(s) == 4, CEILING_S)
    span = llm_spans(spans)[f"{out.id}-0"]
    assert (span.trace_id, span.parent_span_id, span.service_name) == (TRACE_A, PARENT_A, "tokenmill-under-test")
    assert span.attributes["gen_ai.usage.completion_tokens"] == out.usage.completion_tokens == 3
    assert_phases(span, spans)


def test_the_flag_without_opentelemetry_installed_names_the_pip_command():
    # As if the packages were missing; the check runs before the model is loaded.
    code = ("import sys; sys.modules['opentelemetry.sdk'] = None; "
            "from tokenmill.server.__main__ import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--model", "no-such-model", "--otlp-traces-endpoint",
                           "http://127.0.0.1:4317"], capture_output=True, text=True, timeout=CEILING_S)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'tokenmill[otel]'" in proc.stderr and "Traceback" not in proc.stderr


def test_without_the_flag_no_opentelemetry_sdk_is_loaded(tiny_model):
    # A fresh process (this one has loaded the receiver's protobufs), serving a traced caller.
    code = textwrap.dedent(f"""
        import sys
        import httpx
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from server_harness import running_server
        with running_server({str(tiny_model)!r}) as server:
            r = httpx.post(server.url + "/v1/completions", json={{"prompt": "ROMEO:", "max_tokens": 2}},
                           headers={{"traceparent": "00-{TRACE_A}-{PARENT_A}-01"}})
            assert r.status_code == 200, r.text
        # (FastAPI itself imports OpenTelemetry's API when it is installed: not the SDK.)
        heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "grpc", "tokenmill.server.otel_tracer")
        loaded = sorted(m for m in sys.modules if m.startswith(heavy))
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CEILING_S)
    assert proc.returncode == 0, proc.stderr


def test_a_request_cut_short_is_traced_up_to_its_abort_once():
    tracer = OTelTracer(exporter := InMemorySpanExporter(), MODEL)
    tracker = RequestTracker(tracer)
    ctx = RequestContext("cut-1", traceparent(TRACE_A, PARENT_A))
    token = bind_request(ctx)  # as the middleware does
    try:
        tracker.register("cmpl-cut-0", 3, SamplingParams(n=2, max_tokens=8))
        tracker.register("cmpl-queued-0", 3, SamplingParams(max_tokens=8))
    finally:
        unbind_request(token)
    t0 = time.monotonic()
    times = RequestTimes(t0, first_scheduled=t0 + 0.1, first_token=t0 + 0.2, last_token=t0 + 0.3)
    outputs = [CompletionOutput(0, "a", [5]), CompletionOutput(1, "b", [6], finish_reason="length")]
    tracker.on_output(RequestOutput("cmpl-cut-0", None, [1, 2, 3], outputs, finished=False), times)
    for _ in range(2):
        tracker.on_abort("cmpl-cut-0")
        tracker.on_abort("cmpl-queued-0")  # never reached the engine's outputs
    tracer.shutdown()

    spans = exporter.get_finished_spans()
    requests = {s.attributes["gen_ai.request.id"]: s for s in spans if s.name == "llm_request"}
    assert sorted(requests) == ["cmpl-cut-0", "cmpl-queued-0"]
    cut = requests["cmpl-cut-0"]
    assert format_trace_id(cut.context.trace_id) == TRACE_A == ctx.trace_id
    assert cut.attributes["gen_ai.response.finish_reasons"] == ("abort", "length")
    assert cut.attributes["gen_ai.usage.completion_tokens"] == 2
    assert sorted(s.name for s in spans if s.parent and s.parent.span_id == cut.context.span_id) == [
        "decode", "prefill", "queue"]
    queued = requests["cmpl-queued-0"]
    assert queued.attributes["gen_ai.response.finish_reasons"] == ("abort",)
    assert "gen_ai.latency.time_in_queue" not in queued.attributes  # it was never scheduled
    assert not [s for s in spans if s.parent and s.parent.span_id == queued.context.span_id]
    assert [f.engine_request_id for f in ctx.finished] == ["cmpl-cut-0", "cmpl-queued-0"]
