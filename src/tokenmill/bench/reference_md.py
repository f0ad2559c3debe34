"""`bench reference` output: the result as a Markdown block, the command that reproduces it,
and the marked part of a file that the block replaces (text written around it survives)."""

from __future__ import annotations

import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

from tokenmill.bench.reference import (
    LABEL,
    PREFILL_PROMPTS,
    ReferenceResult,
    ReferenceSpec,
    reference_dtype,
)

MARK_BEGIN, MARK_END = "<!-- reference:begin -->", "<!-- reference:end -->"


def command_line(spec: ReferenceSpec, output: str | None = None) -> str:
    """The `tokenmill bench reference` command that reproduces spec (default flags left out)."""
    default = ReferenceSpec()
    flags = {"models": "--models", "concurrencies": "--concurrency", "model_dir": "--model",
             "input_len": "--input-len", "output_len": "--output-len", "prefill_len": "--prefill-len"}
    switches = {"with_hf": "--no-hf", "with_served": "--no-served", "with_prefill": "--no-prefill"}
    args = ["tokenmill", "bench", "reference"] + (["--output", output] if output else [])
    for f in fields(spec):
        value = getattr(spec, f.name)
        if value == getattr(default, f.name) or (f.name == "models" and spec.model_dir is not None):
            continue
        if f.name in switches:
            args.append(switches[f.name])
        else:
            args += [flags[f.name], ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(args)


def _num(v: float | None, digits: int = 1) -> str | None:
    return None if v is None else f"{v:,.{digits}f}"


def _ratio(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}x"


def markdown_table(headers: list[str], rows: list[list[str | None]]) -> str:
    """A Markdown table; columns empty in every row are left out; numbers right-aligned."""
    keep = [i for i in range(len(headers)) if i < 2 or any(r[i] is not None for r in rows)]
    lines = ["| " + " | ".join(headers[i] for i in keep) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in keep) + " |"]
    lines += ["| " + " | ".join(r[i] or "-" for i in keep) + " |" for r in rows]
    return "\n".join(lines)


def _machine_lines(hw: dict[str, Any], sw: dict[str, Any]) -> list[str]:
    gpus = ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in hw.get("gpus", [])) or "none"
    memory = f"{hw['memory_bytes'] / 2**30:.1f} GiB" if hw.get("memory_bytes") else "unknown"
    commit = f" ({sw['git_commit']})" if sw.get("git_commit") else ""
    return [
        f"- Hardware: {hw['cpu_model']}, {hw['cpu_cores']} cores, {memory} memory; "
        f"ISA: {', '.join(hw['isa_flags']) or 'none of note'}; GPU: {gpus}",
        f"- Software: tokenmill {sw.get('tokenmill')}{commit}, torch {sw.get('torch')}, "
        f"transformers {sw.get('transformers')}, Python {sw.get('python')}",
    ]


def _decode_table(result: ReferenceResult) -> str:
    return markdown_table(["model", "concurrency", "tokenmill offline", "HF generate", "tokenmill / HF",
                   "tokenmill served", "served / offline", "TTFT p50 (ms)", "TTFT p99 (ms)"],
                  [[r.model, str(r.concurrency), _num(r.tokenmill.output_tokens_per_s),
                    _num(r.hf.output_tokens_per_s if r.hf else None), _ratio(r.hf_ratio),
                    _num(r.served.output_tokens_per_s if r.served else None), _ratio(r.served_ratio),
                    _num(r.served.ttft_p50_ms if r.served else None),
                    _num(r.served.ttft_p99_ms if r.served else None)] for r in result.decode_rows])


def _prefill_table(result: ReferenceResult) -> str:
    return markdown_table(["model", "prompt tokens", "tokenmill", "HF forward", "tokenmill / HF"],
                  [[r.model, str(r.prompt_len), _num(r.tokenmill.input_tokens_per_s),
                    _num(r.hf.input_tokens_per_s if r.hf else None), _ratio(r.hf_ratio)]
                   for r in result.prefill_rows])


def render_markdown(result: ReferenceResult, command: str) -> str:
    """The reference as a Markdown block between MARK_BEGIN and MARK_END."""
    spec = result.spec
    source = f"checkpoint `{Path(spec.model_dir).name}`" if spec.model_dir else \
        "random-weight checkpoints with published configs"
    method = "Offline: one wave of `concurrency` requests (2 at concurrency 1)."
    if spec.with_hf:
        method += " HF runs the same prompts as left-padded static batches of that size."
    if any(r.served for r in result.decode_rows):
        method += (" Served: closed-loop `bench serve` against `tokenmill serve --max-num-seqs <concurrency>`, "
                   "2 x concurrency requests (4 at concurrency 1) after 1 warm-up.")
    lines = [MARK_BEGIN, "", f"Measured {result.started_at:%Y-%m-%d %H:%M} UTC with", "",
             f"    {command}", "", *_machine_lines(result.hardware, result.software),
             f"- Workload: {source}, {reference_dtype()}, {spec.input_len} prompt + {spec.output_len} output tokens "
             "per request, greedy, ignore_eos. Throughput is output tokens/s.", "",
             method, "",
             "### Decode throughput", "", _decode_table(result)]
    if result.prefill_rows:
        lines += ["", f"### Prefill (prompt tokens/s; mean over {PREFILL_PROMPTS} prompts, max_tokens=1)", "",
                  _prefill_table(result)]
    for r in result.decode_rows:
        if r.served and r.served.num_failed:
            lines += ["", f"Note: served {r.model} at concurrency {r.concurrency}: "
                          f"{r.served.num_failed} requests failed."]
    if result.run_ids:
        ids = result.run_ids
        lines += ["", f"History: runs {ids[0]}-{ids[-1]} (label `{LABEL}`, series `{result.series}`)."]
    return "\n".join([*lines, "", MARK_END]) + "\n"


def write_marked(path: Path, block: str, mark_begin: str = MARK_BEGIN, mark_end: str = MARK_END) -> None:
    """Put block (which starts and ends with the markers) into path between the markers,
    keeping the text around them.

    A missing file is created; a file without both markers gets the block appended.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    begin = text.find(mark_begin)
    end = text.find(mark_end, begin + 1) if begin >= 0 else -1
    if begin >= 0 and end >= 0:
        text = text[:begin] + block.rstrip("\n") + text[end + len(mark_end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
