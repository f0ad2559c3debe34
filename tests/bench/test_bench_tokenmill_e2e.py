"""End to end: `bench serve` against a real `tokenmill serve` on loopback.

The server runs a tiny random-weight checkpoint (built here, placeholder tokenizer) so the
test needs neither the demo model nor a download. Skipped until the server module exists.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from bench_fake_openai import free_port
from test_bench_model_configs import TINY_LLAMA

from tokenmill.bench.cli import main as bench_main
from tokenmill.bench.model_configs import build_checkpoint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tokenmill.server.api_server") is None,
    reason="tokenmill serve (tokenmill.server.api_server) has not landed yet",
)


@pytest.fixture(scope="module")
def tokenmill_server(tmp_path_factory):
    ckpt = build_checkpoint(TINY_LLAMA, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer_dir=None)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "serve", "--model", str(ckpt), "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", "16MiB"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tokenmill serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tokenmill serve not healthy after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base, ckpt
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve_against_tokenmill(tokenmill_server, endpoint, tmp_path, capsys):
    base, ckpt = tokenmill_server
    db = tmp_path / "bench.db"
    code = bench_main(["serve", "--base-url", base, "--endpoint", endpoint, "--tokenizer", str(ckpt),
                       "--db", str(db), "--num-prompts", "4", "--max-concurrency", "2", "--num-warmups", "1",
                       "--random-input-len", "16", "--random-output-len", "8", "--disable-tqdm"])
    out = capsys.readouterr()
    assert code == 0, out.err
    run_id = int(out.out.strip())

    assert bench_main(["history", "--db", str(db), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["id"] == run_id and row["kind"] == "serve"
    assert row["model"] == Path(ckpt).name
    assert row["summary"]["num_completed"] == 4 and row["summary"]["num_failed"] == 0
    assert row["summary"]["total_output_tokens"] == 4 * 8  # ignore_eos honoured
    assert row["summary"]["ttft"]["count"] == 4 and row["summary"]["tpot"]["mean_ms"] > 0
    assert row["server"]["name"] == "tokenmill" and row["server"]["config"]
    assert row["config_hash"]

    report = tmp_path / "report.html"
    assert bench_main(["report", "--db", str(db), "--output", str(report)]) == 0
    parser = _Parser()
    parser.feed(report.read_text())
    assert parser.tags.count("svg") >= 4 and "table" in parser.tags
