"""`bench throughput`: offline engine throughput on a fixed token-id workload.

Both backends get the same prompts (random token ids, seeded) and generate exactly the
requested number of tokens (ignore_eos / min_new_tokens), so their ratio is measured in one
run on one machine. Timing covers generation only: model loading and one small warm-up
generate are excluded. Output tokens counted are the requested ones: the HF backend runs
left-padded static batches up to the batch's longest output, and that padding waste is its
cost, not extra throughput.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.bench.hardware import hardware_fingerprint, software_fingerprint
from tokenmill.bench.schema import RunRecord
from tokenmill.bench.workloads import sample_length, sampleable_ids

BACKENDS = ("tokenmill", "hf")


@dataclass(frozen=True)
class ThroughputSpec:
    model_dir: str
    backend: str = "tokenmill"  # tokenmill | hf
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    seed: int = 0
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_num_seqs: int = 32  # tokenmill's running-batch cap; the HF backend's batch size
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None  # tokenmill: KV budget (None: the engine's default)
    max_model_len: int | None = None  # tokenmill: None = the workload's longest sequence
    device: str = "cpu"  # cpu | cuda (both backends)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if min(self.num_prompts, self.input_len, self.output_len, self.max_num_seqs) < 1:
            raise ValueError("num_prompts, input_len, output_len and max_num_seqs must be >= 1")


@dataclass(frozen=True)
class ThroughputResult:
    backend: str
    num_requests: int
    total_input_tokens: int
    total_output_tokens: int
    elapsed_s: float

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def input_tokens_per_s(self) -> float:
        """Prompt tokens/s: the prefill rate when output_len is 1."""
        return self.total_input_tokens / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.total_output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.total_input_tokens + self.total_output_tokens) / self.elapsed_s

    def to_summary(self) -> dict[str, Any]:
        """Stored summary; throughput keys match serve runs so compare/cost treat both alike."""
        return {**asdict(self), "request_throughput": self.requests_per_s,
                "output_throughput": self.output_tokens_per_s,
                "total_token_throughput": self.total_tokens_per_s}


def make_prompts(spec: ThroughputSpec, vocab_size: int, avoid_ids: set[int]) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; depends on the seed only."""
    rng = np.random.default_rng([spec.seed, 11])
    ids = sampleable_ids(vocab_size, avoid_ids)
    prompts = []
    for _ in range(spec.num_prompts):
        n_in = sample_length(rng, spec.input_len, spec.range_ratio)
        n_out = sample_length(rng, spec.output_len, spec.range_ratio)
        prompts.append((rng.choice(ids, size=n_in).tolist(), n_out))
    return prompts


def _special_ids(cfg: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    return ids


def run_throughput(spec: ThroughputSpec) -> ThroughputResult:
    """Measure one backend on the spec's workload.

    Args:
        spec: model folder, backend and workload.

    Returns:
        ThroughputResult (elapsed covers generation only).
    """
    cfg = _model_config(spec.model_dir)
    prompts = make_prompts(spec, int(cfg["vocab_size"]), _special_ids(cfg))
    runner = _run_tokenmill if spec.backend == "tokenmill" else _run_hf
    elapsed_s, num_out = runner(spec, prompts, cfg)
    return ThroughputResult(spec.backend, len(prompts), sum(len(p) for p, _ in prompts), num_out, elapsed_s)


def _model_config(model_path: str) -> dict[str, Any]:
    """config.json's contents; for a GGUF file the same fields from its metadata."""
    from tokenmill.model.gguf import is_gguf_file

    if is_gguf_file(model_path):
        from tokenmill.model.gguf.config import model_config_from_gguf
        from tokenmill.model.gguf.reader import GGUFFile
        from tokenmill.quant.hf_files import config_json

        return config_json(model_config_from_gguf(GGUFFile(model_path)), "float32")
    return json.loads((Path(model_path) / "config.json").read_text())


def _run_tokenmill(spec: ThroughputSpec, prompts: list[tuple[list[int], int]], cfg: dict) -> tuple[float, int]:
    from tokenmill import LLM, SamplingParams  # lazy: the engine is heavy to import

    # The longest sequence of the workload is enough context; the model's own maximum (128k for
    # Llama-3.2) would make the engine demand a KV cache far larger than the run needs.
    longest = max(len(p) + n for p, n in prompts)
    kwargs: dict[str, Any] = {"model": spec.model_dir, "dtype": spec.dtype, "max_num_seqs": spec.max_num_seqs,
                              "max_model_len": spec.max_model_len or longest, "device": spec.device}
    if spec.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if spec.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = spec.kv_cache_memory_bytes
    llm = LLM(**kwargs)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    llm.generate([{"prompt_token_ids": prompts[0][0][:16]}], params(4), use_tqdm=False)  # warm-up
    lens = {n for _, n in prompts}
    sampling = params(lens.pop()) if len(lens) == 1 else [params(n) for _, n in prompts]
    inputs = [{"prompt_token_ids": p} for p, _ in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, sampling, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def _torch_dtype(name: str) -> Any:
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {list(table)}, got {name!r}")
    return table[name]


def _run_hf(spec: ThroughputSpec, prompts: list[tuple[list[int], int]], cfg: dict) -> tuple[float, int]:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise RuntimeError("--backend hf needs transformers: pip install -e '.[dev]'") from exc
    if Path(spec.model_dir).suffix == ".gguf":  # transformers dequantizes it (to float32 for auto)
        from tokenmill.bench.quality.local import load_transformers_model

        model = load_transformers_model(spec.model_dir, spec.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=_torch_dtype(spec.dtype)).eval()
    model = model.to(spec.device)
    pad_id = cfg.get("pad_token_id") or 0

    def generate(batch: list[tuple[list[int], int]]) -> None:
        width = max(len(p) for p, _ in batch)
        # Left padding keeps every sequence's last prompt token in the last column.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch], device=spec.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=spec.device)
        n = max(o for _, o in batch)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=n,
                                 max_new_tokens=n, pad_token_id=pad_id)
        out.cpu()  # wait for the device: the clock stops after the last token

    generate([(prompts[0][0][:16], 4)])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(prompts), spec.max_num_seqs):
        generate(prompts[i: i + spec.max_num_seqs])
    elapsed = time.perf_counter() - t0
    return elapsed, sum(n for _, n in prompts)


def throughput_record(spec: ThroughputSpec, result: ThroughputResult, model_name: str,
                      hardware_sku: str | None = None, instance_type: str = "", label: str = "") -> RunRecord:
    """A history row for a throughput run (kind "throughput", no per-request samples)."""
    engine = {k: v for k, v in asdict(spec).items() if k in ("dtype", "max_num_seqs", "max_num_batched_tokens",
                                                          "kv_cache_memory_bytes", "max_model_len")}
    return RunRecord(
        kind="throughput", model=model_name, workload=asdict(spec), summary=result.to_summary(),
        hardware=hardware_fingerprint(hardware_sku), software=software_fingerprint(),
        server={"name": spec.backend, "config": {"backend": spec.backend, **engine}},
        label=label, instance_type=instance_type,
    )
