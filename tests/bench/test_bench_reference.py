"""`bench reference` end to end on a tiny random checkpoint: offline, HF and served rows.

Starts real `tokenmill serve` subprocesses (one per concurrency); HF rows need transformers
(a dev dependency).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from test_bench_model_configs import TINY_LLAMA

from tokenmill.bench.cli import main as bench_main
from tokenmill.bench.model_configs import build_checkpoint
from tokenmill.bench.reference import ReferenceSpec
from tokenmill.bench.reference_md import MARK_BEGIN, MARK_END, command_line, write_marked


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the data rows of the table under a '### heading'."""
    section = markdown.split(f"### {heading}", 1)[1]
    table = re.search(r"^\|.*(?:\n\|.*)*", section, re.MULTILINE).group(0).splitlines()
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]  # past header and alignment


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="the HF rows need transformers (a dev dependency)")
def test_reference_tiny_checkpoint(tmp_path, capsys):
    ckpt = build_checkpoint(TINY_LLAMA, tmp_path / "tiny", tokenizer_dir=None)
    out_file, db = tmp_path / "performance.md", tmp_path / "bench.db"
    out_file.write_text(f"# Performance\n\nIntro by hand.\n\n{MARK_BEGIN}\nold table\n{MARK_END}\n\n"
                        "## Analysis\n\nKept as written.\n")

    code = bench_main(["reference", "--model", str(ckpt), "--input-len", "8", "--output-len", "4",
                       "--concurrency", "1,2", "--prefill-len", "32", "--output", str(out_file), "--db", str(db)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "[1/8] tokenmill offline" in out.err and "tokenmill served" in out.err

    text = out_file.read_text()
    assert text.startswith("# Performance\n\nIntro by hand.\n\n" + MARK_BEGIN)
    assert text.endswith(MARK_END + "\n\n## Analysis\n\nKept as written.\n")
    assert "old table" not in text and text.count(MARK_BEGIN) == 1
    assert "tokenmill bench reference --output" in text and "--concurrency 1,2" in text
    assert "torch " in text and "cores" in text

    decode = _table_rows(text, "Decode throughput")
    assert [(r[0], r[1]) for r in decode] == [("tiny", "1"), ("tiny", "2")]
    for row in decode:  # offline, HF, ratio, served, ratio, TTFT p50, TTFT p99
        assert len(row) == 9 and all(_number(c) > 0 for c in row[2:])
    (prefill,) = _table_rows(text, "Prefill")
    assert prefill[:2] == ["tiny", "32"] and all(_number(c) > 0 for c in prefill[2:])

    # Every measurement is a history run labelled "reference"; stdout lists their ids.
    run_ids = [int(x) for x in out.out.split()]
    assert len(run_ids) == 8
    assert bench_main(["history", "--db", str(db), "--json", "--limit", "0"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert sorted(r["id"] for r in runs) == sorted(run_ids)
    assert {r["label"] for r in runs} == {"reference"} and len({r["series"] for r in runs}) == 1
    assert sorted(r["kind"] for r in runs).count("serve") == 2
    served = [r for r in runs if r["kind"] == "serve"]
    assert all(r["summary"]["num_failed"] == 0 and r["summary"]["total_output_tokens"] == 4 * 4 for r in served)
    assert re.search(rf"History: runs {min(run_ids)}-{max(run_ids)} ", text)


def test_write_marked_appends_and_creates(tmp_path):
    path = tmp_path / "perf.md"
    block = f"{MARK_BEGIN}\nnew\n{MARK_END}\n"
    write_marked(path, block)  # missing file: created
    assert path.read_text() == block
    path.write_text("# Notes\n\nNo markers here.\n")
    write_marked(path, block)  # no markers: appended
    assert path.read_text() == "# Notes\n\nNo markers here.\n\n" + block
    write_marked(path, block.replace("new", "newer"))  # now replaced in place
    assert path.read_text() == "# Notes\n\nNo markers here.\n\n" + block.replace("new", "newer")


def test_command_line_and_spec_validation():
    assert command_line(ReferenceSpec(), "docs/performance.md") == \
        "tokenmill bench reference --output docs/performance.md"
    spec = ReferenceSpec(models=("qwen2.5-0.5b",), concurrencies=(1, 4), with_hf=False, input_len=16)
    assert command_line(spec) == "tokenmill bench reference --models qwen2.5-0.5b --concurrency 1,4 --input-len 16 --no-hf"
    assert [t[:2] for t in ReferenceSpec(model_dir=str(Path("/x/my-model"))).targets()] == [("my-model", (1, 16, 64))]
    with pytest.raises(ValueError, match="unknown model"):
        ReferenceSpec(models=("gpt-5",))
    with pytest.raises(ValueError):
        ReferenceSpec(concurrencies=(0,))
