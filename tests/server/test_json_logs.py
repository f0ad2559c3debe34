"""`tokenmill serve --log-format json`: a real server process whose every log line, its own and
uvicorn's, from startup to exit, is one JSON object; a generating request's "finished"
record carries the client's X-Request-Id, the response id, method, path, status, token
counts equal to the response's usage and the engine's timings; anything else logged on the
request's behalf (a warning, the access line) carries the same request id.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from datetime import datetime, timezone

import httpx
import openai
from server_harness import CEILING_S, ServedProcess

from tokenmill.server.json_logs import JsonFormatter, RequestContextFilter
from tokenmill.server.request_context import RequestContext, bind_request, unbind_request

MODEL = "m"


def test_every_line_is_json_and_the_request_records_join_on_the_request_id(tiny_model):
    served = ServedProcess(tiny_model, "--dtype", "float32", "--kv-cache-memory", "64MiB", "--served-model-name",
                           MODEL, "--log-format", "json")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        full = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4,
                                         extra_body={"ignore_eos": True, "not_a_known_field": 1},
                                         extra_headers={"x-request-id": "json-full-1"})
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "JULIET:"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"x-request-id": "json-stream-1"}))
        assert httpx.get(served.url + "/health", timeout=CEILING_S).status_code == 200
        served.proc.send_signal(signal.SIGTERM)
        log = served.stop()
    finally:
        served.kill()

    records = []
    for line in log.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    for r in records:
        assert list(r)[:4] == ["timestamp", "level", "logger", "message"], r
        assert datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    loggers = {r["logger"] for r in records}
    assert {"tokenmill.server", "uvicorn.error", "uvicorn.access"} <= loggers
    assert any("engine stopped" in r["message"] for r in records)  # the last words, too

    def finished_record(request_id: str) -> dict:
        [record] = [r for r in records if r.get("request_id") == request_id and "response_id" in r]
        return record

    rec = finished_record("json-full-1")
    assert rec["response_id"] == full.id and rec["logger"] == "tokenmill.server" and rec["level"] == "INFO"
    assert (rec["method"], rec["path"], rec["status"]) == ("POST", "/v1/completions", 200)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (full.usage.prompt_tokens, 4)
    assert 0 <= rec["queue_s"] <= rec["ttft_s"] <= rec["e2e_s"] and rec["duration_s"] >= rec["e2e_s"]
    assert rec["finish_reasons"] == ["length"] and "trace_id" not in rec  # no tracing here

    rec = finished_record("json-stream-1")
    usage = chunks[-1].usage
    assert rec["response_id"] == chunks[0].id and rec["path"] == "/v1/chat/completions" and rec["status"] == 200
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert 0 <= rec["queue_s"] <= rec["ttft_s"] <= rec["e2e_s"]

    # Written on the request's behalf: the unknown field's warning and uvicorn's access line.
    [warning] = [r for r in records if "not_a_known_field" in r["message"]]
    assert warning["level"] == "WARNING" and warning["request_id"] == "json-full-1"
    [access] = [r for r in records if r["logger"] == "uvicorn.access" and r.get("request_id") == "json-full-1"]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/v1/completions", 200)


def test_a_record_is_one_line_with_its_fields_its_request_and_its_traceback():
    try:
        raise ValueError("boom\non two lines")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("tokenmill.server", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info)
    record.since = datetime(2026, 1, 1, tzinfo=timezone.utc)  # not JSON: written as its str()
    token = bind_request(RequestContext("req-7", {}, trace_id="ab" * 16))
    try:
        assert RequestContextFilter().filter(record)
    finally:
        unbind_request(token)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert (out["level"], out["logger"], out["message"]) == ("ERROR", "tokenmill.server", "failed here")
    assert (out["request_id"], out["trace_id"]) == ("req-7", "ab" * 16)
    assert out["since"] == "2026-01-01 00:00:00+00:00"
    assert out["exception"].startswith("Traceback") and "ValueError: boom\non two lines" in out["exception"]
