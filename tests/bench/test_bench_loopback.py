"""The load generator and the CLI against the scripted fake server over real loopback TCP."""

from __future__ import annotations

import asyncio
import json

import pytest
from bench_fake_openai import FakeState, RealServer, uniform_script

from tokenmill.bench.cli import main as bench_main
from tokenmill.bench.schema import LoadSpec
from tokenmill.bench.serve import ServeSpec, run_serve_async
from tokenmill.bench.store import Store
from tokenmill.bench.workloads import WorkloadSpec

TTFT_S, ITL_S = 0.08, 0.02
# Real sleeps on a loaded 2-core machine: timings are checked to a few milliseconds.
TOL_S = 0.02


@pytest.fixture(scope="module")
def server():
    state = FakeState(lambda body: uniform_script(body.get("max_tokens") or 4, TTFT_S, ITL_S))
    with RealServer(state) as srv:
        yield srv


def spec(srv, **load) -> ServeSpec:
    return ServeSpec(base_url=srv.base_url + "/v1", model="fake-model",
                     workload=WorkloadSpec(random_input_len=8, random_output_len=5),
                     load=LoadSpec(**{"num_warmups": 0, **load}), show_progress=False)


def test_closed_loop_measures_scripted_timings(server, word_tokenizer, db_path):
    server.state.max_in_flight = 0
    with Store(db_path) as store:
        out = asyncio.run(run_serve_async(spec(server, num_prompts=6, max_concurrency=2), store,
                                          tokenizer=word_tokenizer))
        saved = store.get_run(out.record.id)
    s = out.summary
    assert (s.num_completed, s.num_failed, s.num_incomplete) == (6, 0, 0)
    assert s.ttft.median_ms == pytest.approx(TTFT_S * 1e3, abs=TOL_S * 1e3)
    assert s.tpot.median_ms == pytest.approx(ITL_S * 1e3, abs=TOL_S * 1e3)
    assert s.itl.median_ms == pytest.approx(ITL_S * 1e3, abs=TOL_S * 1e3)
    assert s.total_output_tokens == 30 and s.total_input_tokens == 6 * 7  # server usage wins
    assert server.state.max_in_flight == 2
    assert saved.server == {"name": "fake", "version": "0.0"} and len(saved.samples) == 6
    assert saved.samples[0].chunk_times_s == out.record.samples[0].chunk_times_s


def test_duration_bound_and_open_loop(server, word_tokenizer):
    out = asyncio.run(run_serve_async(spec(server, num_prompts=None, duration_s=0.6, request_rate=20.0),
                                      tokenizer=word_tokenizer))
    n = out.summary.num_completed
    assert 4 <= n <= 25  # ~12 expected at 20 req/s over 0.6 s
    assert all(x.start_s < 0.6 for x in out.record.samples)
    assert out.summary.duration_s < 0.6 + TTFT_S + 5 * ITL_S + 0.5


def test_stop_keeps_partial_results(server, word_tokenizer):
    async def go():
        stop = asyncio.Event()
        sent_before = len(server.state.bodies)

        async def stop_when_under_way():
            while len(server.state.bodies) < sent_before + 12:  # several requests finished by now
                await asyncio.sleep(0.02)
            stop.set()

        stopper = asyncio.create_task(stop_when_under_way())
        try:
            return await run_serve_async(spec(server, num_prompts=1000, request_rate=50.0), stop=stop,
                                         tokenizer=word_tokenizer)
        finally:
            stopper.cancel()

    out = asyncio.run(go())
    assert out.record.interrupted
    assert out.summary.num_completed >= 1 and out.summary.num_incomplete >= 1
    assert out.summary.num_completed + out.summary.num_incomplete == len(out.record.samples) < 1000


def test_cli_serve_history_compare_report(server, word_tokenizer, db_path, tmp_path, capsys, parse_html):
    common = ["--base-url", server.base_url, "--tokenizer", word_tokenizer.path, "--db", str(db_path),
              "--random-input-len", "8", "--random-output-len", "4", "--num-prompts", "6",
              "--max-concurrency", "3", "--disable-tqdm", "--goodput", "ttft:500", "tpot:100"]
    assert bench_main(["serve", *common, "--label", "A"]) == 0
    first = int(capsys.readouterr().out.strip())
    assert bench_main(["serve", *common, "--label", "B", "--save-result", "--result-dir", str(tmp_path)]) == 0
    second = int(capsys.readouterr().out.strip())
    assert json.loads((tmp_path / f"tokenmill-bench-run{second}.json").read_text())["completed"] == 6

    assert bench_main(["history", "--db", str(db_path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in runs] == [second, first]
    row = runs[0]
    assert {"id", "time", "hardware", "model", "workload", "summary"} <= row.keys()
    assert row["model"] == "fake-model" and row["summary"]["num_completed"] == 6
    assert row["summary"]["slo_attainment"] == 1.0 and row["hardware"]["cpu_cores"] >= 1
    assert bench_main(["history", "--db", str(db_path), "--json", "--model", "nope"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    code = bench_main(["compare", str(first), str(second), "--db", str(db_path), "--json"])
    verdicts = {c["metric"]: c["verdict"] for c in json.loads(capsys.readouterr().out)}
    assert {"ttft", "tpot", "itl", "e2el", "output_throughput"} <= verdicts.keys()
    # Real timings of 6 requests: the verdict may go either way; the exit code must follow it.
    assert code == (1 if "regression" in verdicts.values() else 0)

    report = tmp_path / "report.html"
    assert bench_main(["report", "--db", str(db_path), "--output", str(report),
                       "--compare", str(first), str(second)]) == 0
    html = report.read_text()
    parser = parse_html(html)
    tags = parser.tag_names
    assert tags.count("svg") >= 4 and "table" in tags
    text = " ".join(parser.text)
    for section in ("Latency CDFs", "Percentiles", "A/B comparison", "Cost per million tokens"):
        assert section in text
    assert "http://" not in html.replace(server.base_url, "") and "https://" not in html
    assert not any(a.get("src") or a.get("href") for _, a in parser.tags)


def test_cli_unreachable_server_fails_fast(db_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "t1 t2", "output_len": 2}) + "\n")
    code = bench_main(["serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--db", str(db_path),
                       "--num-prompts", "2", "--disable-tqdm", "--num-warmups", "0",
                       "--dataset-name", "file", "--dataset-path", str(prompts)])
    captured = capsys.readouterr()
    assert code == 2 and "cannot reach" in captured.err  # fails fast, before measuring
    with Store(db_path) as store:
        assert store.list_runs() == []


def test_ctrl_c_saves_partial_run(server, word_tokenizer, db_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.bench.cli", "serve", "--base-url", server.base_url, "--tokenizer",
         word_tokenizer.path, "--db", str(db_path), "--num-prompts", "1000", "--request-rate", "20",
         "--random-input-len", "8", "--random-output-len", "4", "--disable-tqdm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sent_before = len(server.state.bodies)
    deadline = time.monotonic() + 30
    while len(server.state.bodies) < sent_before + 8 and time.monotonic() < deadline:  # under way
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    with Store(db_path) as store:
        run = store.get_run(int(out.strip()))
    assert run.interrupted and 1 <= run.summary["num_completed"] < 1000
    assert len(run.samples) == run.summary["num_completed"] + run.summary["num_failed"] + run.summary["num_incomplete"]
