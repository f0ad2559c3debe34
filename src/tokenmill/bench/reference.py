"""`bench reference`: the project's performance reference table, reproduced in one command.

tokenmill offline, the Hugging Face transformers baseline and tokenmill served are measured
side by side in one run on one machine (ratios, not absolute times, are what carry over),
on random-weight checkpoints with real models' architectures. Every measurement is an
ordinary throughput or serve run stored in the history (label "reference", one series per
invocation); the result renders as a Markdown block that replaces the marked part of a file.
"""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
from tokenmill.bench.model_configs import (
    MODEL_CONFIGS,
    ArchConfig,
    cached_checkpoint,
    sync_tokenizer,
)
from tokenmill.bench.schema import LoadSpec, RunRecord
from tokenmill.bench.serve import ServeSpec, run_serve
from tokenmill.bench.store import Store
from tokenmill.bench.throughput import (
    ThroughputResult,
    ThroughputSpec,
    run_throughput,
    throughput_record,
)
from tokenmill.bench.workloads import WorkloadSpec

# Concurrencies per model config; PRIMARY_MODEL also gets the served and prefill rows.
DEFAULT_CONCURRENCIES = {"smollm2-135m": (1, 16, 64), "qwen2.5-0.5b": (1, 64), "llama-3.2-1b": (1, 64)}
PRIMARY_MODEL = "smollm2-135m"
LABEL = "reference"
MARK_BEGIN, MARK_END = "<!-- reference:begin -->", "<!-- reference:end -->"
DTYPE = "bfloat16"  # the natural CPU dtype here (DESIGN.md); HF runs in it too
SEED = 0  # workload seed: offline, HF and served rows get the same prompts
ENGINE_MAX_MODEL_LEN = 512  # context configured for offline and served engines alike
PREFILL_PROMPTS = 3  # prefill rate = mean over this many prompts, one at a time
SERVER_START_TIMEOUT_S = 600.0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReferenceSpec:
    models: tuple[str, ...] = tuple(DEFAULT_CONCURRENCIES)  # model-config names
    concurrencies: tuple[int, ...] = ()  # empty: DEFAULT_CONCURRENCIES (1,16,64 for a --model DIR)
    model_dir: str | None = None  # measure this checkpoint instead of the model configs
    input_len: int = 128  # prompt tokens per request
    output_len: int = 128  # generated tokens per request (ignore_eos)
    prefill_len: int = 1024  # prompt tokens of the prefill rows
    with_hf: bool = True
    with_served: bool = True
    with_prefill: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in DEFAULT_CONCURRENCIES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(DEFAULT_CONCURRENCIES)}")
        if not self.models and self.model_dir is None:
            raise ValueError("no model selected")
        if min((*self.concurrencies, self.input_len, self.output_len, self.prefill_len)) < 1:
            raise ValueError("concurrencies, input_len, output_len and prefill_len must be >= 1")

    def targets(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """(model name, concurrencies, is_primary) per model, in measuring order."""
        if self.model_dir is not None:
            return [(Path(self.model_dir).name, self.concurrencies or DEFAULT_CONCURRENCIES[PRIMARY_MODEL], True)]
        return [(m, self.concurrencies or DEFAULT_CONCURRENCIES[m], m == PRIMARY_MODEL) for m in self.models]


@dataclass(frozen=True)
class ServedResult:
    """One closed-loop `bench serve` run against a `tokenmill serve` subprocess."""

    run_id: int | None
    num_completed: int
    num_failed: int
    output_tokens_per_s: float
    ttft_p50_ms: float | None  # None: no request completed
    ttft_p99_ms: float | None


@dataclass(frozen=True)
class DecodeRow:
    """Output tokens/s of one model at one concurrency."""

    model: str
    concurrency: int
    tokenmill: ThroughputResult
    hf: ThroughputResult | None = None
    served: ServedResult | None = None

    @property
    def hf_ratio(self) -> float | None:
        return self.tokenmill.output_tokens_per_s / self.hf.output_tokens_per_s if self.hf else None

    @property
    def served_ratio(self) -> float | None:
        return self.served.output_tokens_per_s / self.tokenmill.output_tokens_per_s if self.served else None


def prompt_tokens_per_s(result: ThroughputResult) -> float:
    return result.total_input_tokens / result.elapsed_s


@dataclass(frozen=True)
class PrefillRow:
    """Prompt tokens/s of single long prompts (max_tokens=1), one at a time."""

    model: str
    prompt_len: int
    tokenmill: ThroughputResult
    hf: ThroughputResult | None = None

    @property
    def hf_ratio(self) -> float | None:
        return prompt_tokens_per_s(self.tokenmill) / prompt_tokens_per_s(self.hf) if self.hf else None


@dataclass
class ReferenceResult:
    spec: ReferenceSpec
    started_at: datetime
    hardware: dict[str, Any]
    software: dict[str, Any]
    series: str
    decode_rows: list[DecodeRow] = field(default_factory=list)
    prefill_rows: list[PrefillRow] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)


@dataclass
class _Context:
    """What every measurement shares: the spec, where runs go, and the progress log."""

    spec: ReferenceSpec
    store: Store | None
    series: str
    log: Log
    num_steps: int
    run_ids: list[int] = field(default_factory=list)
    step: int = 0

    def start(self, what: str) -> float:
        self.step += 1
        self.log(f"[{self.step}/{self.num_steps}] {what}")
        return time.perf_counter()

    def save(self, record: RunRecord) -> None:
        record.label, record.series = LABEL, self.series
        if self.store is not None:
            self.run_ids.append(self.store.save(record))


def count_steps(spec: ReferenceSpec) -> int:
    per_point = 1 + spec.with_hf
    total = 0
    for _, concurrencies, primary in spec.targets():
        total += len(concurrencies) * (per_point + (spec.with_served and primary))
        total += per_point if spec.with_prefill and primary else 0
    return total


def _offline(ctx: _Context, model: str, model_dir: str, backend: str, concurrency: int) -> ThroughputResult:
    spec = ctx.spec
    max_model_len = max(ENGINE_MAX_MODEL_LEN, spec.input_len + spec.output_len)
    tp = ThroughputSpec(model_dir, backend, num_prompts=concurrency if concurrency > 1 else 2,
                        input_len=spec.input_len, output_len=spec.output_len, seed=SEED, dtype=DTYPE,
                        max_num_seqs=concurrency, max_model_len=max_model_len)
    what = "tokenmill offline (LLM.generate)" if backend == "tokenmill" else "HF transformers generate, static batch"
    is_large = model in DEFAULT_CONCURRENCIES and model != PRIMARY_MODEL
    slow = " (HF on a large model: this can take many minutes)" if backend == "hf" and is_large else ""
    t0 = ctx.start(f"{what}, {model}, concurrency {concurrency}: {tp.num_prompts} x "
                   f"({tp.input_len} in + {tp.output_len} out){slow}")
    result = run_throughput(tp)
    ctx.save(throughput_record(tp, result, model))
    ctx.log(f"    {result.output_tokens_per_s:,.1f} output tok/s ({time.perf_counter() - t0:.1f} s)")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tokenmill_server(model_dir: str, dtype: str, max_model_len: int, max_num_seqs: int) -> Iterator[str]:
    """Run `tokenmill serve` in a subprocess until the block ends; yields its base URL.

    The server's output goes to a temporary log, shown (its tail) only if it fails to start.
    """
    port = _free_port()
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--model", model_dir, "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
           "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, base, log)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: the server drains, then exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, base: str, log: Any) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "is not healthy in time"
            raise RuntimeError(f"tokenmill serve {state}:\n{tail}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def _served(ctx: _Context, model: str, model_dir: str, concurrency: int) -> ServedResult:
    spec = ctx.spec
    num_prompts = 2 * concurrency if concurrency > 1 else 4
    t0 = ctx.start(f"tokenmill served (bench serve, closed loop), {model}, concurrency {concurrency}: "
                   f"{num_prompts} x ({spec.input_len} in + {spec.output_len} out), 1 warm-up")
    # Token-id prompts give every request exactly input_len prompt tokens, as offline.
    workload = WorkloadSpec("random", random_input_len=spec.input_len, random_output_len=spec.output_len,
                            random_range_ratio=0.0, prompt_format="token-ids", seed=SEED)
    load = LoadSpec(max_concurrency=concurrency, num_prompts=num_prompts, num_warmups=1, seed=SEED)
    max_model_len = max(ENGINE_MAX_MODEL_LEN, spec.input_len + spec.output_len)
    with tokenmill_server(model_dir, DTYPE, max_model_len, concurrency) as base:
        serve = ServeSpec(base_url=base, workload=workload, load=load, tokenizer_path=model_dir, ignore_eos=True,
                          temperature=0.0, label=LABEL, series=ctx.series)
        outcome = run_serve(serve)
    ctx.save(outcome.record)
    if outcome.record.interrupted:  # Ctrl-C: the partial run is stored, the reference stops
        raise KeyboardInterrupt
    s = outcome.summary
    ctx.log(f"    {s.output_throughput:,.1f} output tok/s, TTFT p50 {s.ttft.median_ms:,.1f} ms, "
            f"{s.num_completed} ok / {s.num_failed} failed ({time.perf_counter() - t0:.1f} s)")
    for error in dict.fromkeys(x.error for x in outcome.record.samples if x.status == "error"):
        ctx.log(f"    error: {error}")
    ok = s.num_completed > 0
    return ServedResult(outcome.record.id, s.num_completed, s.num_failed, s.output_throughput,
                        s.ttft.median_ms if ok else None, s.ttft.percentiles_ms.get("p99") if ok else None)


def full_vocab_view(checkpoint: Path, cfg: ArchConfig, out_dir: Path) -> Path:
    """The checkpoint with a placeholder tokenizer that covers the model's whole vocabulary.

    Cached model-config checkpoints carry the demo model's tokenizer (4,096 tokens), which
    decodes most ids of a 49k-152k vocabulary to nothing: the server would then stream empty
    chunks that no client can time. Weights and config are linked, not copied.
    """
    out_dir.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name not in _TOKENIZER_FILES:
            (out_dir / f.name).symlink_to(f.resolve())
    sync_tokenizer(out_dir, cfg, None)
    return out_dir


def _prefill(ctx: _Context, model: str, model_dir: str, backend: str) -> ThroughputResult:
    spec = ctx.spec
    tp = ThroughputSpec(model_dir, backend, num_prompts=PREFILL_PROMPTS, input_len=spec.prefill_len, output_len=1,
                        seed=SEED, dtype=DTYPE, max_num_seqs=1,
                        max_model_len=max(ENGINE_MAX_MODEL_LEN, spec.prefill_len + 1))
    name = "tokenmill offline" if backend == "tokenmill" else "HF transformers"
    t0 = ctx.start(f"prefill, {name}, {model}: {PREFILL_PROMPTS} prompts of {spec.prefill_len} tokens, "
                   "max_tokens=1, one at a time")
    result = run_throughput(tp)
    ctx.save(throughput_record(tp, result, model))
    ctx.log(f"    {prompt_tokens_per_s(result):,.1f} prompt tok/s ({time.perf_counter() - t0:.1f} s)")
    return result


def run_reference(spec: ReferenceSpec, store: Store | None = None, log: Log | None = None,
                  series: str | None = None) -> ReferenceResult:
    """Measure every row of the reference.

    Args:
        spec: what to measure.
        store: each measurement is saved there as it finishes (so Ctrl-C keeps them).
        log: progress lines (default: stderr).
        series: history series id of this invocation (default: a new one).

    Returns:
        ReferenceResult with one DecodeRow per (model, concurrency) and the prefill rows.
    """
    from tokenmill.bench.display import err_console
    from tokenmill.bench.sweep import new_series_id

    log = log or (lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    ctx = _Context(spec, store, series or new_series_id(LABEL), log, count_steps(spec))
    result = ReferenceResult(spec, datetime.now(timezone.utc), hardware_fingerprint(), software_fingerprint(),
                             ctx.series, run_ids=ctx.run_ids)
    with tempfile.TemporaryDirectory(prefix="tokenmill-reference-") as views:
        for model, concurrencies, primary in spec.targets():
            model_dir = spec.model_dir
            if model_dir is None:
                log(f"checkpoint {model} (random weights, built once and cached)")
                model_dir = str(full_vocab_view(cached_checkpoint(model), MODEL_CONFIGS[model], Path(views) / model))
            _measure_model(ctx, result, model, model_dir, concurrencies, primary)
    return result


def _measure_model(ctx: _Context, result: ReferenceResult, model: str, model_dir: str,
                   concurrencies: tuple[int, ...], primary: bool) -> None:
    spec = ctx.spec
    for c in concurrencies:
        row = DecodeRow(model, c, _offline(ctx, model, model_dir, "tokenmill", c))
        if spec.with_hf:
            row = replace(row, hf=_offline(ctx, model, model_dir, "hf", c))
        if spec.with_served and primary:
            row = replace(row, served=_served(ctx, model, model_dir, c))
        result.decode_rows.append(row)
    if spec.with_prefill and primary:
        prefill = PrefillRow(model, spec.prefill_len, _prefill(ctx, model, model_dir, "tokenmill"))
        if spec.with_hf:
            prefill = replace(prefill, hf=_prefill(ctx, model, model_dir, "hf"))
        result.prefill_rows.append(prefill)


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


def _table(headers: list[str], rows: list[list[str | None]]) -> str:
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
             f"- Workload: {source}, {DTYPE}, {spec.input_len} prompt + {spec.output_len} output tokens "
             "per request, greedy, ignore_eos. Throughput is output tokens/s.", "",
             method, "",
             "### Decode throughput", "",
             _table(["model", "concurrency", "tokenmill offline", "HF generate", "tokenmill / HF",
                     "tokenmill served", "served / offline", "TTFT p50 (ms)", "TTFT p99 (ms)"],
                    [[r.model, str(r.concurrency), _num(r.tokenmill.output_tokens_per_s),
                      _num(r.hf.output_tokens_per_s if r.hf else None), _ratio(r.hf_ratio),
                      _num(r.served.output_tokens_per_s if r.served else None), _ratio(r.served_ratio),
                      _num(r.served.ttft_p50_ms if r.served else None),
                      _num(r.served.ttft_p99_ms if r.served else None)] for r in result.decode_rows])]
    if result.prefill_rows:
        lines += ["", f"### Prefill (prompt tokens/s; mean over {PREFILL_PROMPTS} prompts, max_tokens=1)", "",
                  _table(["model", "prompt tokens", "tokenmill", "HF forward", "tokenmill / HF"],
                         [[r.model, str(r.prompt_len), _num(prompt_tokens_per_s(r.tokenmill)),
                           _num(prompt_tokens_per_s(r.hf) if r.hf else None), _ratio(r.hf_ratio)]
                          for r in result.prefill_rows])]
    failed = [r for r in result.decode_rows if r.served and r.served.num_failed]
    for r in failed:
        lines += ["", f"Note: served {r.model} at concurrency {r.concurrency}: {r.served.num_failed} requests failed."]
    if result.run_ids:
        ids = result.run_ids
        lines += ["", f"History: runs {ids[0]}-{ids[-1]} (label `{LABEL}`, series `{result.series}`)."]
    return "\n".join([*lines, "", MARK_END]) + "\n"


def write_marked(path: Path, block: str) -> None:
    """Put block into path between the markers, keeping the text around them.

    A missing file is created; a file without both markers gets the block appended.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    begin = text.find(MARK_BEGIN)
    end = text.find(MARK_END, begin + 1) if begin >= 0 else -1
    if begin >= 0 and end >= 0:
        text = text[:begin] + block.rstrip("\n") + text[end + len(MARK_END):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
