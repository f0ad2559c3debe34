"""`bench reference`: the project's performance reference table, reproduced in one command.

tokenmill offline, the Hugging Face transformers baseline and tokenmill served are measured
side by side in one run on one machine (ratios, not absolute times, are what carry over),
on random-weight checkpoints with real models' architectures. Every measurement is an
ordinary throughput or serve run stored in the history (label "reference", one series per
invocation); the result renders as a Markdown block that replaces the marked part of a file
(reference_md.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
from tokenmill.bench.model_configs import cached_checkpoint
from tokenmill.bench.schema import LoadSpec, RunRecord
from tokenmill.bench.serve import ServeSpec, run_serve
from tokenmill.bench.server_process import tokenmill_server
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
def reference_dtype() -> str:
    """The dtype `--dtype auto` picks on this CPU (bfloat16 with native bf16 matmuls, else
    float32), by name, so tokenmill, HF and the served engine all run in it."""
    import torch

    from tokenmill.config import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")

SEED = 0  # workload seed: offline, HF and served rows get the same prompts
ENGINE_MAX_MODEL_LEN = 512  # context configured for offline and served engines alike
PREFILL_PROMPTS = 3  # prefill rate = mean over this many prompts, one at a time

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

    @property
    def max_model_len(self) -> int:
        """Context of the decode rows' engines, offline and served alike (same KV cache size)."""
        return max(ENGINE_MAX_MODEL_LEN, self.input_len + self.output_len)

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


@dataclass(frozen=True)
class PrefillRow:
    """Prompt tokens/s of single long prompts (max_tokens=1), one at a time."""

    model: str
    prompt_len: int
    tokenmill: ThroughputResult
    hf: ThroughputResult | None = None

    @property
    def hf_ratio(self) -> float | None:
        return self.tokenmill.input_tokens_per_s / self.hf.input_tokens_per_s if self.hf else None


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
    tp = ThroughputSpec(model_dir, backend, num_prompts=concurrency if concurrency > 1 else 2,
                        input_len=spec.input_len, output_len=spec.output_len, seed=SEED, dtype=reference_dtype(),
                        max_num_seqs=concurrency, max_model_len=spec.max_model_len)
    what = "tokenmill offline (LLM.generate)" if backend == "tokenmill" else "HF transformers generate, static batch"
    is_large = model in DEFAULT_CONCURRENCIES and model != PRIMARY_MODEL
    slow = " (HF on a large model: this can take many minutes)" if backend == "hf" and is_large else ""
    t0 = ctx.start(f"{what}, {model}, concurrency {concurrency}: {tp.num_prompts} x "
                   f"({tp.input_len} in + {tp.output_len} out){slow}")
    result = run_throughput(tp)
    ctx.save(throughput_record(tp, result, model))
    ctx.log(f"    {result.output_tokens_per_s:,.1f} output tok/s ({time.perf_counter() - t0:.1f} s)")
    return result


def _served(ctx: _Context, model: str, model_dir: str, concurrency: int) -> ServedResult:
    spec = ctx.spec
    num_prompts = 2 * concurrency if concurrency > 1 else 4
    t0 = ctx.start(f"tokenmill served (bench serve, closed loop), {model}, concurrency {concurrency}: "
                   f"{num_prompts} x ({spec.input_len} in + {spec.output_len} out), 1 warm-up")
    # Token-id prompts give every request exactly input_len prompt tokens, as offline.
    workload = WorkloadSpec("random", random_input_len=spec.input_len, random_output_len=spec.output_len,
                            random_range_ratio=0.0, prompt_format="token-ids", seed=SEED)
    load = LoadSpec(max_concurrency=concurrency, num_prompts=num_prompts, num_warmups=1, seed=SEED)
    serve_args = ["--dtype", reference_dtype(), "--max-model-len", str(spec.max_model_len),
                  "--max-num-seqs", str(concurrency)]
    with tokenmill_server(model_dir, serve_args) as base:
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


def _prefill(ctx: _Context, model: str, model_dir: str, backend: str) -> ThroughputResult:
    spec = ctx.spec
    tp = ThroughputSpec(model_dir, backend, num_prompts=PREFILL_PROMPTS, input_len=spec.prefill_len, output_len=1,
                        seed=SEED, dtype=reference_dtype(), max_num_seqs=1,
                        max_model_len=max(ENGINE_MAX_MODEL_LEN, spec.prefill_len + 1))
    name = "tokenmill offline" if backend == "tokenmill" else "HF transformers"
    t0 = ctx.start(f"prefill, {name}, {model}: {PREFILL_PROMPTS} prompts of {spec.prefill_len} tokens, "
                   "max_tokens=1, one at a time")
    result = run_throughput(tp)
    ctx.save(throughput_record(tp, result, model))
    ctx.log(f"    {result.input_tokens_per_s:,.1f} prompt tok/s ({time.perf_counter() - t0:.1f} s)")
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
    for model, concurrencies, primary in spec.targets():
        model_dir = spec.model_dir
        if model_dir is None:
            log(f"checkpoint {model} (random weights, built once and cached)")
            model_dir = str(cached_checkpoint(model))
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
