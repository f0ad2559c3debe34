"""`bench spec` (run_spec_bench) measures speculation off and each speculative config side
by side in one process on the grounded and chat workloads: one engine per config, built
once, warmed up, and reused for every workload and concurrency, with `concurrency`
requests kept in flight by this module (closed loop); repeats are interleaved so that
machine drift hits every config alike.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.spec_counts import SpecDecodeCounts

NGRAM_K4 = {"method": "ngram", "num_speculative_tokens": 4}


@dataclass(frozen=True)
class SpecBenchSpec:
    """What `bench spec` measures: every config x workload x concurrency, `repeats` times."""

    model: str | None = None  # checkpoint folder or GGUF; None: the default model
    quantization: str = "auto"  # the target's (a draft's is in its speculative config)
    dtype: str = "auto"
    speculative_configs: tuple[dict[str, Any], ...] = (NGRAM_K4,)  # each measured against off
    workloads: tuple[str, ...] = ("grounded", "chat")
    concurrencies: tuple[int, ...] = (1, 64)
    num_prompts: int | None = None  # per cell; None: max(6, concurrency)
    repeats: int = 1
    temperature: float = 0.0
    ignore_eos: bool = False  # natural endings: past them a small model loops, which flatters ngram
    grounded_input_len: int = 256
    grounded_output_len: int = 128
    grounded_path: str | None = None
    chat_output_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrencies must be >= 1, got {self.concurrencies}")
        if self.repeats < 1 or (self.num_prompts is not None and self.num_prompts < 1):
            raise ValueError("repeats and num_prompts must be >= 1")
        if not set(self.workloads) <= {"grounded", "chat"} or not self.workloads:
            raise ValueError(f"workloads must be grounded and/or chat, got {self.workloads}")

    def prompts_for(self, concurrency: int) -> int:
        # One wave at high concurrency (a 2-core CPU takes minutes for two waves of 64);
        # at low concurrency, several requests so one odd prompt does not decide the cell.
        return self.num_prompts or max(6, concurrency)


@dataclass
class SpecCell:
    """One config on one workload at one concurrency, over all repeats."""

    workload: str
    concurrency: int
    config: str  # label: "off", "ngram k=4", ...
    speculative_config: dict[str, Any] | None
    num_requests: int
    output_tokens: list[int] = field(default_factory=list)  # per repeat
    elapsed_s: list[float] = field(default_factory=list)  # per repeat
    ratios_vs_off: list[float] = field(default_factory=list)  # per repeat, against off's same repeat
    counts: SpecDecodeCounts | None = None  # summed over repeats; None: speculation off

    @property
    def output_tokens_per_s(self) -> float:
        return statistics.median(n / s for n, s in zip(self.output_tokens, self.elapsed_s))

    @property
    def ratio_vs_off(self) -> float | None:
        """Median over repeats of the paired ratio (drift between repeats cancels)."""
        return statistics.median(self.ratios_vs_off) if self.ratios_vs_off else None

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "concurrency": self.concurrency, "config": self.config,
                "speculative_config": self.speculative_config, "num_requests": self.num_requests,
                "output_tokens": self.output_tokens, "elapsed_s": self.elapsed_s,
                "output_tokens_per_s": self.output_tokens_per_s, "ratio_vs_off": self.ratio_vs_off,
                "spec_decode": self.counts.to_summary() if self.counts else None}


@dataclass
class SpecBenchResult:
    spec: SpecBenchSpec
    model: str
    cells: list[SpecCell]
    hardware: dict[str, Any]
    software: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"spec": asdict(self.spec), "model": self.model, "hardware": self.hardware,
                           "software": self.software, "cells": [c.to_dict() for c in self.cells]}, indent=1)


def config_label(config: dict[str, Any] | None) -> str:
    """Short name of a speculative config for tables: "off", "ngram k=4", "draft_model k=4 (d.gguf)"."""
    if config is None:
        return "off"
    label = f"{config.get('method')} k={config.get('num_speculative_tokens')}"
    extras = {k: v for k, v in config.items() if k not in ("method", "num_speculative_tokens", "model")}
    if config.get("model"):
        label += f" ({Path(str(config['model'])).name})"
    return label + (" " + json.dumps(extras, separators=(",", ":")) if extras else "")


Log = Callable[[str], None]
Prompts = list[tuple[list[int], int]]  # (prompt token ids, max_tokens) per request


def run_spec_bench(spec: SpecBenchSpec, log: Log | None = None) -> SpecBenchResult:
    """Measure off and every speculative config side by side (see the module docstring).

    Args:
        spec: what to measure.
        log: progress lines (default: stderr).

    Returns:
        SpecBenchResult, one cell per (workload, concurrency, config) in that order.
    """
    from tokenmill import LLM  # lazy: the engine is heavy to import
    from tokenmill.bench.display import err_console
    from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
    from tokenmill.model.default_model import default_model_path

    log = log or (lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    model_path = spec.model or default_model_path()
    max_c = max(spec.concurrencies)
    prompts = _prompts(spec, model_path, 0, spec.prompts_for)
    warmups = _prompts(spec, model_path, 1, lambda c: min(4, max_c))  # an independent stream
    configs: list[dict[str, Any] | None] = [None, *spec.speculative_configs]
    k_max = max(int(c.get("num_speculative_tokens", 0)) for c in spec.speculative_configs) if configs[1:] else 0
    max_model_len = max(len(ids) + n for p in (*prompts.values(), *warmups.values()) for ids, n in p) + k_max + 1
    engines = []
    for config in configs:
        log(f"building engine: {config_label(config)}")
        # Prefix caching off: every repeat must do the same work (with it, later repeats
        # would skip the prefill the first one paid for). KV for max_c full-length requests.
        llm = LLM(model_path, speculative_config=config, quantization=spec.quantization, dtype=spec.dtype,
                  max_num_seqs=max_c, max_model_len=max_model_len, enable_prefix_caching=False,
                  block_size=16, num_kv_blocks=max_c * math.ceil(max_model_len / 16) + 1, seed=spec.seed)
        # First use of batch shapes and of the proposer, and the adaptive policy's first
        # step timings, happen here rather than in the first measured cell.
        for workload in spec.workloads:
            _measure(llm, warmups[workload, max_c], min(4, max_c), spec, max_tokens=32)
        engines.append(llm)
    cells = {(w, c, i): SpecCell(w, c, config_label(cfg), cfg, len(prompts[w, c]))
             for w in spec.workloads for c in spec.concurrencies for i, cfg in enumerate(configs)}
    num_steps, step = len(cells) * spec.repeats, 0
    for r, w, c in itertools.product(range(spec.repeats), spec.workloads, spec.concurrencies):
        # Configs back to back, in alternating order per repeat: neither side always goes first.
        for i in range(len(configs)) if r % 2 == 0 else reversed(range(len(configs))):
            cell, step = cells[w, c, i], step + 1
            n_out, elapsed_s, counts = _measure(engines[i], prompts[w, c], c, spec)
            cell.output_tokens.append(n_out)
            cell.elapsed_s.append(elapsed_s)
            if counts is not None:
                cell.counts = counts if cell.counts is None else cell.counts + counts
            accept = f", acceptance length {counts.mean_acceptance_length:.2f}" if counts and counts.num_drafts else ""
            log(f"[{step}/{num_steps}] {w} c={c} {cell.config} (repeat {r + 1}/{spec.repeats}): {cell.num_requests} "
                f"requests, {n_out} tokens in {elapsed_s:.2f} s = {n_out / elapsed_s:.1f} output tok/s{accept}")
    for (w, c, i), cell in cells.items():
        off = cells[w, c, 0]
        if i > 0:  # paired per repeat: the two ran back to back on the same machine state
            cell.ratios_vs_off = [(n / s) / (n0 / s0) for n, s, n0, s0 in
                                  zip(cell.output_tokens, cell.elapsed_s, off.output_tokens, off.elapsed_s)]
    return SpecBenchResult(spec, Path(model_path).name, list(cells.values()), hardware_fingerprint(),
                           software_fingerprint())


def _prompts(spec: SpecBenchSpec, model_path: str, stream: int,
             count: Callable[[int], int]) -> dict[tuple[str, int], Prompts]:
    """(workload, concurrency) -> its first count(concurrency) requests of the workload's
    seeded stream, each as one user turn through the model's chat template (what a chat
    request is); a model without a template gets the plain text."""
    from tokenmill.bench.tokenizer import HFTokenizer
    from tokenmill.bench.workloads import WorkloadSpec, iter_requests
    from tokenmill.tokenizer import Tokenizer

    tokenizer, model_tokenizer = HFTokenizer(model_path), Tokenizer.load(model_path)
    out = {}
    for name in spec.workloads:
        workload = WorkloadSpec(dataset_name=name, grounded_input_len=spec.grounded_input_len,
                                grounded_output_len=spec.grounded_output_len, grounded_path=spec.grounded_path,
                                chat_output_len=spec.chat_output_len, seed=spec.seed)
        reqs = itertools.islice(iter_requests(workload, tokenizer, stream), max(map(count, spec.concurrencies)))
        ids = [(model_tokenizer.encode_chat([{"role": "user", "content": str(r.prompt)}])
                if model_tokenizer.chat_template else model_tokenizer.encode(str(r.prompt)), r.output_len or 1)
               for r in reqs]
        for c in spec.concurrencies:
            out[name, c] = ids[:count(c)]
    return out


def _measure(llm: Any, prompts: Prompts, concurrency: int, spec: SpecBenchSpec,
             max_tokens: int | None = None) -> tuple[int, float, SpecDecodeCounts | None]:
    """Run prompts with `concurrency` in flight (the next is added as soon as one finishes).

    Returns:
        (output tokens, seconds, speculative counters over these requests; None when off).
        Engine steps are timed, not tokenization or detokenization (the same for every config).
    """
    from tokenmill import SamplingParams
    from tokenmill.engine.request import EngineCoreRequest

    engine = llm.engine
    stop_ids = set() if spec.ignore_eos else set(llm.config.model.eos_token_ids)
    queue = deque(enumerate(prompts))
    before = SpecDecodeCounts.from_engine(engine.stats())
    num_out = in_flight = idle_steps = 0
    start = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < concurrency:
            index, (ids, n) = queue.popleft()
            # A seed per request: sampled runs draw the same random numbers under every config.
            params = SamplingParams(temperature=spec.temperature, max_tokens=min(n, max_tokens or n),
                                    ignore_eos=spec.ignore_eos, seed=spec.seed + index)
            params.all_stop_token_ids = stop_ids  # what the front ends fill in
            engine.validate_prompt(ids)
            engine.add_request(EngineCoreRequest(f"spec-bench-{next(_request_ids)}", ids, params))
            in_flight += 1
        outputs = engine.step()
        idle_steps = 0 if outputs else idle_steps + 1
        if idle_steps > 1000:
            raise RuntimeError("the engine made no progress in 1000 steps")
        for out in outputs:
            num_out += len(out.new_token_ids)
            in_flight -= out.finish_reason is not None
    elapsed_s = time.perf_counter() - start
    after = SpecDecodeCounts.from_engine(engine.stats())
    return num_out, elapsed_s, after.since(before) if after and before else None


_request_ids = itertools.count()  # engine request ids must be unique per engine; unique per process is simpler
