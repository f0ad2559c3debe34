"""`tokenmill bench gpu`'s whole path, small, on the CPU: every number it reports is
computed (the GPU only changes the device and adds the profiler's kernel rows)."""

from __future__ import annotations

import pytest

from tokenmill.bench.gpu import (
    GpuBenchSpec,
    command_line,
    render_markdown,
    run_gpu_bench,
    write_result,
)
from tokenmill.config import DEMO_MODEL_DIR


def test_gpu_bench_measures_and_renders_on_any_device(tmp_path):
    spec = GpuBenchSpec(models=(DEMO_MODEL_DIR,), batches=(1, 2), input_len=8, output_len=6, device="cpu",
                        dtype="float32", profile_batch=2)
    lines: list[str] = []
    result = run_gpu_bench(spec, log=lines.append)
    assert [(r.batch, r.tokenmill_tok_s > 0, r.hf_tok_s > 0) for r in result.rows] == [(1, True, True), (2, True, True)]
    (roof,) = result.rooflines
    # The demo model: 8.4M float32 parameters, tied embeddings read once by the LM head.
    assert 30e6 < roof.bytes_per_token < 40e6
    assert roof.ms_per_token > 0 and roof.copy_gb_s > 0 and 0 < roof.fraction
    assert result.profile_step_ms is not None and result.profile_step_ms > 0

    out = tmp_path / "perf.md"
    out.write_text("# Performance\n\n<!-- gpu:begin -->\nold\n<!-- gpu:end -->\n\nafter\n")
    write_result(out, render_markdown(spec, result, command_line(spec, "perf.md")))
    text = out.read_text()
    assert "old" not in text and text.endswith("after\n") and "tokenmill bench gpu --output perf.md" in text
    assert text.count("| ") > 8 and "of copy bandwidth" in text


def test_gpu_bench_command_line_lists_what_differs_from_the_defaults():
    assert command_line(GpuBenchSpec(), None) == "tokenmill bench gpu"
    spec = GpuBenchSpec(models=("llama-3.2-1b",), batches=(1, 64), with_hf=False)
    assert command_line(spec, "docs/performance.md") == (
        "tokenmill bench gpu --output docs/performance.md --models llama-3.2-1b --batches 1,64 --no-hf")


@pytest.mark.parametrize(("name", "gb_s"), [("NVIDIA H200", 4800), ("NVIDIA H100 80GB HBM3", 3350)])
def test_nominal_bandwidth_by_device_name(name, gb_s):
    from tokenmill.bench.gpu import _nominal

    assert _nominal(name) == gb_s


def test_nominal_bandwidth_matches_whole_names_only():
    from tokenmill.bench.gpu import _nominal

    assert _nominal("NVIDIA L40") is None and _nominal("NVIDIA L4") == 300
