"""End to end: `bench serve` against a real `tokenmill serve` on loopback.

The server runs a tiny random-weight checkpoint (built here, placeholder tokenizer) so the
test needs neither the demo model nor a download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bench_model_configs import TINY_LLAMA

from tokenmill.bench.cli import main as bench_main
from tokenmill.bench.model_configs import build_checkpoint
from tokenmill.bench.server_process import tokenmill_server


@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory):
    """(base URL, checkpoint folder) of a tokenmill server running a tiny checkpoint."""
    ckpt = build_checkpoint(TINY_LLAMA, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer_dir=None)
    serve_args = ["--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", "16MiB"]
    with tokenmill_server(str(ckpt), serve_args, start_timeout_s=120) as base:
        yield base, ckpt


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve_against_tokenmill(served_tiny, endpoint, tmp_path, capsys, parse_html):
    base, ckpt = served_tiny
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
    tags = parse_html(report.read_text()).tag_names
    assert tags.count("svg") >= 4 and "table" in tags
