"""`eval perplexity` as a library call: text -> windows -> a backend -> numbers -> history.

Backends: "tokenmill" (the engine, in process), "hf" (transformers on the same token ids:
the reference implementation), "server" (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
from tokenmill.bench.quality.distributions import LogitsFile, LogitsWriter
from tokenmill.bench.quality.local import (
    load_transformers_model,
    score_with_engine,
    score_with_transformers,
)
from tokenmill.bench.quality.protocol import Protocol, Windows, windows_for_text
from tokenmill.bench.quality.scoring import Accumulator, ScoredPositions
from tokenmill.bench.quality.server import ServerTarget, score_with_server
from tokenmill.bench.quality.summary import run_summary
from tokenmill.bench.schema import RunRecord

BACKENDS = ("tokenmill", "hf", "server")


@dataclass(frozen=True)
class EvalSpec:
    text_path: str
    protocol: Protocol = Protocol()
    backend: str = "tokenmill"
    model: str | None = None  # checkpoint (dir or .gguf); for "server" only its tokenizer
    engine_args: dict[str, Any] = field(default_factory=dict)  # create_engine_config kwargs
    server: ServerTarget | None = None  # backend "server"
    tokenizer: str | None = None  # overrides the tokenizer source (default: model)
    save_logits: str | None = None  # write this run's distributions here
    reference: str | None = None  # a saved logits file to measure against
    label: str = ""
    hardware_sku: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "server" and self.server is None:
            raise ValueError("the server backend needs a ServerTarget (--base-url)")


@dataclass
class EvalOutcome:
    windows: Windows
    scored: ScoredPositions
    record: RunRecord
    elapsed_s: float
    logits_writer: LogitsWriter | None  # --save-logits, completed by finish_logits()


class Progress:
    """One stderr line per completed window, at most every `interval_s` (and the last)."""

    def __init__(self, acc: Accumulator, total: int, enabled: bool, interval_s: float = 2.0) -> None:
        self.acc, self.total, self.enabled, self.interval_s = acc, total, enabled, interval_s
        self.done = 0
        self.t0 = time.perf_counter()
        self._last_print = -math.inf

    def __call__(self, chunk: int) -> None:
        self.done += 1
        now = time.perf_counter()
        if not self.enabled or (now - self._last_print < self.interval_s and self.done < self.total):
            return
        self._last_print = now
        nll = self.acc.scored_so_far()
        per_chunk = (now - self.t0) / self.done
        eta = per_chunk * (self.total - self.done)
        print(f"[{self.done}/{self.total}] PPL so far {math.exp(nll.mean()):.4f}  "
              f"{per_chunk:.2f} s/window  ETA {eta:.0f} s", file=sys.stderr, flush=True)


def _model_name(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else p.resolve().name


def _engine_default_model() -> str:
    """The checkpoint `LLM()` loads when given no model."""
    from tokenmill.config import create_engine_config

    return create_engine_config(None).model_path


def load_tokenizer(path: str | None) -> Any:
    """tokenmill's tokenizer for a checkpoint folder or .gguf file (default: the default model's)."""
    from tokenmill.tokenizer import Tokenizer

    return Tokenizer.load(path or _engine_default_model())


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_eval(spec: EvalSpec) -> EvalOutcome:
    """Score a text and build the run's record; the caller stores it, then save_logits().

    Raises:
        ValueError: bad input (text too short, reference of other windows...).
        FileNotFoundError: text, model or reference missing.
    """
    text = Path(spec.text_path).read_text(encoding="utf-8")
    reference = LogitsFile.load(spec.reference) if spec.reference else None
    llm = None
    if spec.backend == "tokenmill":
        from tokenmill import LLM

        llm = LLM(spec.model, **spec.engine_args)
        tokenizer = load_tokenizer(spec.tokenizer) if spec.tokenizer else llm.get_tokenizer()
    else:
        tokenizer = load_tokenizer(spec.tokenizer or spec.model)
    windows = windows_for_text(tokenizer, text, spec.protocol)
    if spec.save_logits and spec.backend == "server":
        raise ValueError("--save-logits needs whole distributions: save the reference from a local run "
                         "(--backend tokenmill or hf); a server lists only its top --logprobs tokens.")
    acc = Accumulator(windows, reference, spec.save_logits)
    progress = Progress(acc, windows.num_chunks, spec.show_progress)
    if llm is not None:
        from tokenmill.model import kernels

        cfg = llm.config
        config = {"backend": "tokenmill", **spec.engine_args, "dtype": str(cfg.dtype).removeprefix("torch."),
                  "device": str(cfg.device)}
        if cfg.device.type == "cpu":  # the kernels round differently from the PyTorch ops
            config["cpu_kernels"] = kernels.selected_isa() or "off"
        server_info = {"name": "tokenmill", "config": config}
        model_name = _model_name(cfg.model_path)
        t0 = time.perf_counter()
        score_with_engine(llm, windows, acc, progress)
    elif spec.backend == "hf":
        dtype = spec.engine_args.get("dtype", "auto")
        dtype = "float32" if dtype == "auto" else dtype  # the reference runs in float32
        model_path = spec.model or _engine_default_model()
        model = load_transformers_model(model_path, dtype, spec.show_progress)
        server_info = {"name": "transformers", "config": {"backend": "hf", "dtype": dtype}}
        model_name = _model_name(model_path)
        t0 = time.perf_counter()
        score_with_transformers(model, windows, acc, progress)
    else:
        assert spec.server is not None
        t0 = time.perf_counter()
        server_info = score_with_server(spec.server, windows, acc, tokenizer, progress)
        server_info["client_config"] = {"backend": "server", "num_logprobs": spec.server.num_logprobs}
        model_name = server_info["model"]
    elapsed_s = time.perf_counter() - t0
    scored = acc.result()
    summary = run_summary(scored, windows.num_chunks)
    summary.update(backend=spec.backend, elapsed_s=elapsed_s, scored_tokens_per_s=windows.num_scored / elapsed_s)
    if spec.save_logits:
        summary["logits_id"] = uuid.uuid4().hex[:16]
    if reference is not None:
        summary["reference"] = {k: reference.meta.get(k) for k in ("id", "run_id", "model", "backend", "config")}
    workload = {"text": Path(spec.text_path).name, "text_sha256": _file_sha256(spec.text_path),
                "protocol": windows.describe()}
    record = RunRecord(kind="quality", model=model_name, workload=workload, summary=summary,
                       hardware=hardware_fingerprint(spec.hardware_sku), software=software_fingerprint(),
                       server=server_info, label=spec.label)
    return EvalOutcome(windows, scored, record, elapsed_s, acc.writer)


def finish_logits(outcome: EvalOutcome) -> None:
    """Complete a --save-logits folder: its meta.json names the run (stored first, so its id
    is known) and carries the id the run's summary holds, so a later comparison can tell
    which run was the reference."""
    if outcome.logits_writer is None:
        return
    r = outcome.record
    server = r.server or {}
    outcome.logits_writer.close({"id": r.summary["logits_id"], "run_id": r.id, "model": r.model,
                      "backend": r.summary["backend"], "config": server.get("config"),
                      "protocol": r.workload["protocol"], "text": r.workload["text"]})
