"""History store and workloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.bench.schema import RequestSample, RunRecord
from tokenmill.bench.store import RunFilter, Store, config_hash, default_db_path
from tokenmill.bench.workloads import WorkloadSpec, iter_requests, load_prompt_file


def record(model="m", sku="sku-a", server=None, label="", kind="serve") -> RunRecord:
    samples = [RequestSample(i, 0.1 * i, "ok", "", 5, 3, "usage", [0.1, 0.2, 0.35], [1, 1, 1]) for i in range(3)]
    return RunRecord(kind, model, {"load": {"request_rate": "inf"}}, {"output_throughput": 10.0},
                     {"sku": sku, "cpu_cores": 2}, {"python": "3"}, server=server, label=label, samples=samples)


def test_roundtrip_and_filters(db_path):
    with Store(db_path) as store:
        a = store.save(record(server={"name": "tokenmill", "config": {"max_num_seqs": 8}}, label="base"))
        b = store.save(record(model="other", sku="sku-b"))
        c = store.save(record(kind="throughput", label="x"))
        got = store.get_run(a)
        assert got.samples[2].chunk_times_s == [0.1, 0.2, 0.35] and got.samples[1].start_s == pytest.approx(0.1)
        assert got.server["config"] == {"max_num_seqs": 8} and got.hardware_sku == "sku-a"
        assert [r.id for r in store.list_runs()] == [c, b, a]
        assert [r.id for r in store.list_runs(RunFilter(sku="SKU-B"))] == [b]
        assert [r.id for r in store.list_runs(RunFilter(model="oth"))] == [b]
        assert [r.id for r in store.list_runs(RunFilter(kind="throughput"))] == [c]
        h = config_hash(got.server)
        assert [r.id for r in store.list_runs(RunFilter(config=h[:6]))] == [a]
        assert [r.id for r in store.list_runs(RunFilter(config="max_num_seqs"))] == [a]
        assert store.list_runs(RunFilter(since="2999-01-01")) == []
        assert len(store.list_runs(RunFilter(until="2999-01-01", limit=2))) == 2
        with pytest.raises(KeyError):
            store.get_run(999)


def test_config_hash_ignores_key_order():
    assert config_hash({"config": {"a": 1, "b": 2}}) == config_hash({"config": {"b": 2, "a": 1}})
    assert config_hash(None) == "" == config_hash({"name": "vllm"})


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENMILL_BENCH_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("TOKENMILL_BENCH_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "tokenmill" / "bench.db"


def take(spec, tok, n, stream=0):
    it = iter_requests(spec, tok, stream)
    return [next(it) for _ in range(n)]


def test_random_workload_lengths_and_seed(word_tokenizer):
    spec = WorkloadSpec(random_input_len=40, random_output_len=10, random_range_ratio=0.5, seed=3)
    reqs = take(spec, word_tokenizer, 200)
    lens = np.array([r.prompt_len for r in reqs])
    assert lens.min() >= 20 and lens.max() <= 60 and lens.std() > 5
    assert all(5 <= r.output_len <= 15 for r in reqs)
    assert all("[BOS]" not in r.prompt for r in reqs)  # special tokens are never sampled
    assert [r.prompt for r in take(spec, word_tokenizer, 5)] == [r.prompt for r in reqs[:5]]
    assert take(spec, word_tokenizer, 1, stream=1)[0].prompt != reqs[0].prompt  # warm-ups differ
    fixed = take(WorkloadSpec(random_input_len=16, random_output_len=4), word_tokenizer, 3)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(16, 4)}
    ids = take(WorkloadSpec(random_input_len=8, prompt_format="token-ids"), word_tokenizer, 1)[0]
    assert isinstance(ids.prompt, list) and len(ids.prompt) == 8


def test_prefix_workload_shares_prefixes(word_tokenizer):
    spec = WorkloadSpec(dataset_name="prefix_repetition", prefix_num_prefixes=3, prefix_prefix_len=10,
                        prefix_suffix_len=5, prefix_output_len=7)
    reqs = take(spec, word_tokenizer, 60)
    prefixes = {" ".join(r.prompt.split()[:10]) for r in reqs}
    assert len(prefixes) == 3
    assert all(r.prompt_len == 15 and r.output_len == 7 for r in reqs)


def test_file_workloads(tmp_path, word_tokenizer):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in (
        {"prompt": "t1 t2 t3", "output_len": 4},
        {"messages": [{"role": "user", "content": "t5 t6"}]},
    )))
    recs = load_prompt_file(jsonl)
    assert recs[0] == {"prompt": "t1 t2 t3", "output_len": 4} and recs[1]["output_len"] is None
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "t1 t2"}, {"from": "gpt", "value": "t3 t4 t5"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
    ]))
    reqs = take(WorkloadSpec(dataset_name="sharegpt", dataset_path=str(share)), word_tokenizer, 3)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [("t1 t2", 2, 3)] * 3  # cycled
    over = take(WorkloadSpec(dataset_name="file", dataset_path=str(share), file_output_len=9), None, 1)[0]
    assert over.output_len == 9
    with pytest.raises(ValueError):
        WorkloadSpec(dataset_name="file")
    with pytest.raises(ValueError):
        iter_requests(WorkloadSpec(), None)
