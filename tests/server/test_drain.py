"""`tokenmill serve` as a real process: SIGTERM drains (running stream completes, new
connections are refused, exit code 0), and the command line's options."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tokenmill.cli import build_parser
from tokenmill.server.args import DEMO_MODEL_NAME, server_settings

NUM_TOKENS = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_process(checkpoint_factory):
    model = checkpoint_factory("llama", max_position_embeddings=2048)
    port = _free_port()
    cmd = [sys.executable, "-m", "tokenmill.server", "--model", str(model), "--port", str(port),
           "--dtype", "float32", "--kv-cache-memory", "64MiB", "--drain-timeout", "60",
           "--served-model-name", "m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + proc.stdout.read())
        time.sleep(0.1)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_running_requests_then_exits_0(served_process):
    proc, url = served_process
    body = {"model": "m", "prompt": "ROMEO:", "max_tokens": NUM_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        # New connections are refused once the listener is closed (uvicorn checks every 0.1 s).
        deadline = time.monotonic() + 5
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    # The stream that was running when the signal came still ran to completion.
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == NUM_TOKENS
    assert proc.wait(timeout=30) == 0
    log = proc.stdout.read()
    assert "draining" in log and "engine stopped" in log


def test_serve_help_and_defaults(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--served-model-name", "--api-key", "--max-waiting-requests",
                   "--drain-timeout", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                   "--kv-cache-memory", "--enable-prefix-caching"):
        assert option in text
    args = parser.parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert server_settings(args).model_name == DEMO_MODEL_NAME
    args = parser.parse_args(["serve", "--model", "/models/Qwen2.5-0.5B/", "--api-key", "k"])
    settings = server_settings(args)
    assert settings.model_name == "Qwen2.5-0.5B" and settings.api_key == "k"
