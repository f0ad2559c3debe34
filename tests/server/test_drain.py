"""`tokenmill serve` as a real process, stopped by SIGTERM: requests in progress finish (or,
at the drain timeout, end with an error event and [DONE], or a 503 body), the listener stays
open meanwhile answering 503, and the process exits 0 with one log line per aborted request
and no traceback; plus the command line's options.

No test depends on the machine's speed: generations are thousands of steps longer than
anything the test waits for, and every wait is for an event, with a generous ceiling.
"""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
from server_harness import CEILING_S, ServedProcess, metric, wait_until

from tokenmill.cli import build_parser
from tokenmill.config import DEMO_MODEL_DIR
from tokenmill.server.args import DEMO_MODEL_NAME, server_settings

CONTEXT = 8192
# Far more decode steps than any wait below lasts, on any machine: a stream that must still
# run when the signal comes always does.
LONG = {"model": "m", "prompt": "ROMEO:", "max_tokens": CONTEXT - 16, "ignore_eos": True}


def serve(model, drain_timeout_s: float) -> ServedProcess:
    return ServedProcess(model, "--dtype", "float32", "--kv-cache-memory", "256MiB", "--drain-timeout",
                         str(drain_timeout_s), "--served-model-name", "m")


def num_running(url: str) -> float:
    return metric(httpx.get(url + "/metrics", timeout=CEILING_S).text, "tokenmill:num_requests_running")


@pytest.fixture
def model(checkpoint_factory):
    return checkpoint_factory("llama", max_position_embeddings=CONTEXT)


def _assert_refused_while_draining(url: str) -> None:
    """New connections are still accepted; /health and new POSTs get 503 + Retry-After."""
    with httpx.Client(base_url=url, timeout=CEILING_S) as fresh:
        health = wait_until(lambda: (r := fresh.get("/health")).status_code == 503 and r)
        post = fresh.post("/v1/completions", json={**LONG, "max_tokens": 1})
    for resp in (health, post):
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "shutting_down"
    assert post.status_code == 503


def test_sigterm_drains_running_requests_then_exits_0(model):
    served = serve(model, drain_timeout_s=600)
    try:
        # Long enough that the probes below (a few ms) end first on any machine; short enough
        # to finish in minutes on a loaded one (1000 steps: 1 to 3 minutes with both cores busy).
        body = {**LONG, "max_tokens": 1000, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=CEILING_S) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            served.proc.send_signal(signal.SIGTERM)
            _assert_refused_while_draining(served.url)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        # The stream that was running when the signal came still ran to completion.
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 1000
        log = served.stop()
    finally:
        served.kill()
    assert "draining" in log and "engine stopped" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):  # the listener closed with the process
        httpx.get(served.url + "/health", timeout=CEILING_S)


@pytest.mark.parametrize("how", ["drain timeout", "second signal"])
def test_unfinished_requests_end_cleanly_at_the_drain_deadline(model, how):
    num_streams, num_full = 20, 2
    served = serve(model, drain_timeout_s=1 if how == "drain timeout" else 600)

    async def main() -> tuple[list[list[str]], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=served.url, timeout=CEILING_S, limits=limits) as c:
            started = asyncio.Event()
            num_started = 0

            async def stream() -> list[str]:
                nonlocal num_started
                async with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
                    assert resp.status_code == 200
                    lines = resp.aiter_lines()
                    events = [await lines.__anext__()]
                    num_started += 1
                    if num_started == num_streams:
                        started.set()
                    events += [line async for line in lines]
                return [e.removeprefix("data: ") for e in events if e]

            streams = [asyncio.ensure_future(stream()) for _ in range(num_streams)]
            fulls = [asyncio.ensure_future(c.post("/v1/completions", json=LONG)) for _ in range(num_full)]
            await asyncio.wait_for(started.wait(), CEILING_S)
            await asyncio.to_thread(wait_until, lambda: num_running(served.url) == num_streams + num_full)
            served.proc.send_signal(signal.SIGTERM)
            if how == "second signal":
                await asyncio.to_thread(_assert_refused_while_draining, served.url)
                served.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*streams), await asyncio.gather(*fulls)

    try:
        streams, fulls = asyncio.run(main())
        log = served.stop()
    finally:
        served.kill()
    for events in streams:
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    for resp in fulls:
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in log and "Cancel" not in log, log
    aborted = [line for line in log.splitlines() if "aborted while draining" in line]
    assert len(aborted) == num_streams + num_full, log
    reason = "a second signal" if how == "second signal" else "the drain timeout of 1 s ran out"
    assert all(reason in line for line in aborted)


def test_serve_help_and_defaults(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--served-model-name", "--api-key", "--max-waiting-requests",
                   "--drain-timeout", "--max-request-body-bytes", "--max-model-len", "--max-num-seqs",
                   "--max-num-batched-tokens", "--kv-cache-memory", "--enable-prefix-caching"):
        assert option in text
    args = parser.parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    settings = server_settings(args)
    assert settings.model_name == "smollm2-135m-instruct" and settings.max_request_body_bytes is None
    demo = server_settings(parser.parse_args(["serve", "--model", DEMO_MODEL_DIR]))
    assert demo.model_name == DEMO_MODEL_NAME
    args = parser.parse_args(["serve", "--model", "/models/Qwen2.5-0.5B/", "--api-key", "k",
                              "--max-request-body-bytes", "2000000"])
    settings = server_settings(args)
    assert settings.model_name == "Qwen2.5-0.5B" and settings.api_key == "k"
    assert settings.max_request_body_bytes == 2_000_000
