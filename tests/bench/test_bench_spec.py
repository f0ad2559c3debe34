"""Speculative decoding in the bench: counters from /metrics, `bench serve` against a speculating
tokenmill server, and `bench spec` (offline, off vs ngram) on the demo model."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import pytest
from bench_fake_openai import FakeState, RealServer, uniform_script
from prometheus_client import CollectorRegistry, Counter, generate_latest

from tokenmill.bench.cli import main as bench_main
from tokenmill.bench.schema import LoadSpec
from tokenmill.bench.serve import ServeSpec, run_serve_async
from tokenmill.bench.server_process import tokenmill_server
from tokenmill.bench.spec_counts import SpecDecodeCounts, spec_decode_delta
from tokenmill.bench.workloads import WorkloadSpec
from tokenmill.config import DEMO_MODEL_DIR
from tokenmill.engine.scheduler_output import SchedulerStats, SpecDecodeStats
from tokenmill.server.metrics import _EngineStatsCollector


def tokenmill_exposition(spec: SpecDecodeStats | None, model: str = "m") -> str:
    """What a tokenmill server's /metrics says for these engine counters (its own collector)."""
    stats = SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                           prefix_cache_hits=0, num_preemptions=0, spec_decode=spec)
    registry = CollectorRegistry()
    registry.register(_EngineStatsCollector(SimpleNamespace(stats=stats), model))
    return generate_latest(registry).decode()


def vllm_exposition(per_model: dict[str, tuple[int, int, int, list[int]]]) -> str:
    """vLLM's names (vllm: prefix, prometheus_client Counters, so with _created series too)."""
    registry = CollectorRegistry()
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    counters = {n: Counter(f"vllm:spec_decode_{n}", n, ["model_name"], registry=registry) for n in names}
    per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "per pos", ["model_name", "position"],
                      registry=registry)
    for model, (*values, positions) in per_model.items():
        for n, v in zip(names, values):
            counters[n].labels(model).inc(v)
        for i, v in enumerate(positions):
            per_pos.labels(model, str(i)).inc(v)
    return generate_latest(registry).decode()


def test_counters_from_tokenmill_exposition_and_delta():
    before = SpecDecodeCounts.from_prometheus(tokenmill_exposition(SpecDecodeStats(10, 40, 12, [7, 3, 2, 0])), "m")
    after = SpecDecodeCounts.from_prometheus(tokenmill_exposition(SpecDecodeStats(30, 120, 52, [25, 15, 8, 4])), "m")
    assert before == SpecDecodeCounts(10, 40, 12, (7, 3, 2, 0))
    delta = spec_decode_delta(before, after)
    assert (delta["num_drafts"], delta["num_draft_tokens"], delta["num_accepted_tokens"]) == (20, 80, 40)
    assert delta["accepted_per_pos"] == [18, 12, 6, 4]
    assert delta["mean_acceptance_length"] == pytest.approx(1 + 40 / 20)  # vLLM: 1 + accepted / drafts
    assert delta["acceptance_rate"] == pytest.approx(40 / 80)  # accepted / draft tokens
    assert delta["per_position_acceptance_rate"] == pytest.approx([0.9, 0.6, 0.3, 0.2])  # per pos / drafts


def test_counters_absent_or_unusable_give_nothing():
    assert SpecDecodeCounts.from_prometheus(tokenmill_exposition(None)) is None  # speculation off
    assert SpecDecodeCounts.from_prometheus("# llama.cpp\nllamacpp:tokens_predicted_total 5\n") is None
    assert SpecDecodeCounts.from_prometheus("not an exposition {{{") is None
    counts = SpecDecodeCounts(5, 20, 4, (3, 1))
    assert spec_decode_delta(None, counts) is None and spec_decode_delta(counts, None) is None
    assert spec_decode_delta(counts, SpecDecodeCounts(2, 8, 1, (1, 0))) is None  # restarted in between
    idle = spec_decode_delta(counts, counts)  # on, but nothing proposed (e.g. disable_by_batch_size)
    assert idle["num_drafts"] == 0 and idle["mean_acceptance_length"] is None and idle["acceptance_rate"] is None


def test_vllm_prefix_and_model_label():
    text = vllm_exposition({"a": (10, 30, 15, [8, 5, 2]), "b": (4, 12, 0, [0, 0, 0])})
    assert "vllm:spec_decode_num_drafts_created" in text  # the parser must skip these
    assert SpecDecodeCounts.from_prometheus(text, "a") == SpecDecodeCounts(10, 30, 15, (8, 5, 2))
    assert SpecDecodeCounts.from_prometheus(text, "b") == SpecDecodeCounts(4, 12, 0, (0, 0, 0))
    # A name the server does not label (an alias): every series is summed.
    assert SpecDecodeCounts.from_prometheus(text, "other") == SpecDecodeCounts(14, 42, 15, (8, 5, 2))


def test_server_without_metrics_stores_no_spec_decode(word_tokenizer):
    state = FakeState(lambda body: uniform_script(body.get("max_tokens") or 3, 0.01, 0.005))
    with RealServer(state) as srv:
        spec = ServeSpec(base_url=srv.base_url, model="fake-model", show_progress=False,
                         workload=WorkloadSpec(random_input_len=8, random_output_len=3),
                         load=LoadSpec(num_prompts=2, num_warmups=0))
        out = asyncio.run(run_serve_async(spec, tokenizer=word_tokenizer))
    assert out.summary.num_completed == 2 and out.load_result.spec_decode is None
    assert "spec_decode" not in out.record.summary


def test_bench_serve_reports_a_speculating_tokenmill(tmp_path, capsys, parse_html):
    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
    db, report = tmp_path / "bench.db", tmp_path / "report.html"
    with tokenmill_server(DEMO_MODEL_DIR, ["--speculative-config", ngram, "--max-model-len", "256",
                                           "--kv-cache-memory", "16MiB"], start_timeout_s=120) as base:
        code = bench_main(["serve", "--base-url", base, "--endpoint", "chat", "--dataset-name", "grounded",
                           "--tokenizer", DEMO_MODEL_DIR, "--grounded-input-len", "96", "--grounded-output-len", "24",
                           "--num-prompts", "3", "--max-concurrency", "1", "--num-warmups", "1",
                           "--db", str(db), "--disable-tqdm"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Speculative decoding" in out.err and "Mean acceptance length" in out.err
    assert bench_main(["history", "--db", str(db), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    sd = row["summary"]["spec_decode"]
    assert sd["num_drafts"] > 0 and sd["num_draft_tokens"] >= sd["num_drafts"]  # warm-up excluded, still some
    assert sd["mean_acceptance_length"] == pytest.approx(1 + sd["num_accepted_tokens"] / sd["num_drafts"])
    assert bench_main(["report", "--db", str(db), "--output", str(report)]) == 0
    assert "Speculative decoding" in parse_html(report.read_text()).text


def test_bench_spec_offline_off_vs_ngram(capsys):
    # Past its end of text the demo model loops, so with --ignore-eos its outputs repeat
    # themselves whatever the passages (tokenmill's own source, which changes) say.
    code = bench_main(["spec", "--model", DEMO_MODEL_DIR, "--concurrency", "1,2", "--num-prompts", "2",
                       "--grounded-input-len", "64", "--grounded-output-len", "48", "--chat-output-len", "16",
                       "--ignore-eos", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    cells = json.loads(out.out)["cells"]
    assert [(c["workload"], c["concurrency"], c["config"]) for c in cells] == [
        (w, c, cfg) for w in ("grounded", "chat") for c in (1, 2) for cfg in ("off", "ngram k=4")]
    for c in cells:
        assert c["num_requests"] == 2 and c["output_tokens"][0] > 0 and c["output_tokens_per_s"] > 0
        if c["config"] == "off":
            assert c["ratio_vs_off"] is None and c["spec_decode"] is None
        else:
            assert c["ratio_vs_off"] > 0 and c["spec_decode"]["num_drafts"] > 0
    # Greedy: speculation changes the speed, never the tokens.
    assert [c["output_tokens"] for c in cells[::2]] == [c["output_tokens"] for c in cells[1::2]]
    grounded = [c for c in cells if c["workload"] == "grounded" and c["config"] != "off"]
    assert all(c["spec_decode"]["mean_acceptance_length"] > 1 for c in grounded)
    assert "vs off" in out.err and "mean acc. len" in out.err and "ngram k=4" in out.err
    assert re.search(r"\d\.\d\dx", out.err)  # ratios printed as 1.05x
