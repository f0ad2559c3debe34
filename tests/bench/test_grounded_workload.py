"""The grounded and chat workloads: seeded, reproducible, passages in their prompts, lengths kept."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokenmill.bench import grounded
from tokenmill.bench.cli import main as bench_main
from tokenmill.bench.tokenizer import HFTokenizer
from tokenmill.bench.workloads import WorkloadSpec, iter_requests
from tokenmill.config import DEMO_MODEL_DIR

PARAGRAPHS = ["ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east.",
              "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\nDeny thy father and refuse thy name.",
              "MERCUTIO:\nA plague on both your houses!\nThey have made worms' meat of me."]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(DEMO_MODEL_DIR)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS * 4) + "\n")
    return path


def first(spec: WorkloadSpec, tok, n: int, stream: int = 0):
    return list(itertools.islice(iter_requests(spec, tok, stream), n))


@pytest.mark.parametrize("name", ["grounded", "chat"])
def test_seeded_and_reproducible(tok, name):
    spec = WorkloadSpec(dataset_name=name, grounded_input_len=96, seed=3)
    a, b = first(spec, tok, 12), first(spec, tok, 12)
    assert a == b
    assert [r.index for r in a] == list(range(12))
    assert [r.prompt for r in first(WorkloadSpec(dataset_name=name, grounded_input_len=96, seed=4), tok, 12)] \
        != [r.prompt for r in a]
    assert [r.prompt for r in first(spec, tok, 12, stream=1)] != [r.prompt for r in a]  # warm-ups differ
    assert len({r.prompt for r in a}) >= 8  # varied, not one prompt repeated


@pytest.mark.parametrize("input_len", [48, 200, 700])
def test_grounded_lengths_respected(tok, input_len):
    spec = WorkloadSpec(dataset_name="grounded", grounded_input_len=input_len, grounded_output_len=40)
    reqs = first(spec, tok, 20)
    for r in reqs:
        assert r.prompt_len == len(tok.encode(r.prompt)) <= input_len
        assert r.output_len == 40
    # Whole lines are cut at the budget, so prompts come close to it.
    assert np.median([r.prompt_len for r in reqs]) >= 0.75 * input_len


def test_prompts_hold_their_passage_code_and_prose(tok, text_file):
    docs = [*grounded.package_documents(), grounded.text_document(text_file)]
    prompts = list(itertools.islice(grounded.grounded_prompts(docs, tok.encode, 160, np.random.default_rng(0)), 60))
    corpus = text_file.read_text()
    kinds = set()
    for p in prompts:
        assert p.passage.strip() and p.passage in p.text
        assert len(tok.encode(p.text)) <= 160
        if "```python" in p.text:
            kinds.add("code")
        elif p.passage in corpus:
            kinds.add("file")
        else:
            kinds.add("docstring")
        if p.task == "rename":  # the renamed identifier is in the passage
            old = p.text.split("`")[1]
            assert old in p.passage
    assert kinds == {"code", "file", "docstring"}
    assert {p.task for p in prompts} >= {"copy", "continue"}


def test_code_passages_are_tokenmill_source(tok):
    code, prose = grounded.package_documents()
    assert grounded.package_root() / "bench" / "grounded.py" == (grounded.package_root() / grounded.__file__)
    assert any(line.startswith("def package_documents(") for line in code.lines)
    assert all(code.lines[i].lstrip().startswith(("def ", "class ", "async def ", "@")) for i in code.start_lines)
    assert any("Endless grounded prompts" in line for line in prose.lines)  # docstrings as prose


def test_token_ids_format_and_tiny_budget(tok):
    spec = WorkloadSpec(dataset_name="grounded", grounded_input_len=64, prompt_format="token-ids")
    for r in first(spec, tok, 5):
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len <= 64
    with pytest.raises(ValueError, match="grounded_input_len"):
        WorkloadSpec(dataset_name="grounded", grounded_input_len=8)
    with pytest.raises(ValueError, match="no such file"):
        WorkloadSpec(dataset_name="grounded", grounded_path="/nonexistent/corpus.txt")


def test_chat_prompts_are_filled_templates(tok):
    reqs = first(WorkloadSpec(dataset_name="chat", chat_output_len=33), tok, 30)
    for r in reqs:
        assert "{" not in r.prompt and r.prompt_len == len(tok.encode(r.prompt)) and r.output_len == 33
    assert len({r.prompt.split()[0] for r in reqs}) >= 4  # several templates used


def test_serve_flags_reach_the_workload(monkeypatch, text_file, db_path):
    seen = {}

    def fake_run_serve(spec, store):
        seen["workload"] = spec.workload
        raise KeyboardInterrupt  # stop before any network use

    monkeypatch.setattr("tokenmill.bench.commands.run_serve", fake_run_serve)
    bench_main(["serve", "--dataset-name", "grounded", "--grounded-input-len", "123", "--grounded-output-len", "7",
                "--grounded-path", str(text_file), "--chat-output-len", "9", "--db", str(db_path)])
    w = seen["workload"]
    assert (w.dataset_name, w.grounded_input_len, w.grounded_output_len, w.grounded_path, w.chat_output_len) == \
        ("grounded", 123, 7, str(text_file), 9)
