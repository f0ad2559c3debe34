"""`tokenmill bench gpu`: tokenmill on a GPU, measured in one run.

- Decode throughput (output tok/s) at several batch sizes, tokenmill and transformers
  `generate` side by side on the same GPU, on random-weight checkpoints with real models'
  architectures and the real default model (bf16, 128 tokens in, 128 out).
- Batch-1 decode against the memory-bandwidth roofline: each token reads every weight and
  the request's K/V once, so bytes per token / time per token is the bandwidth the decode
  achieved; the fraction is of the device-to-device copy bandwidth measured in the same run
  (and of the GPU's nominal figure when known).
- A torch profiler breakdown of one decode step (GPU time per kernel).

The result is a Markdown block that replaces the marked part of a file (docs/performance.md).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.reference_md import markdown_table, write_marked
from tokenmill.bench.throughput import ThroughputSpec, run_throughput

MARK_BEGIN, MARK_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
DEFAULT_MODEL = "default"  # the real default model (SmolLM2-135M-Instruct's GGUF)
MODELS = ("llama-3.2-1b", "qwen2.5-0.5b", DEFAULT_MODEL)
BATCHES = (1, 16, 64, 256)
# Nominal HBM bandwidth by device name (vendor data sheets), GB/s.
NOMINAL_GB_S = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "L4": 300}

Log = Callable[[str], None]


@dataclass(frozen=True)
class GpuBenchSpec:
    models: tuple[str, ...] = MODELS
    batches: tuple[int, ...] = BATCHES
    input_len: int = 128
    output_len: int = 128
    device: str = "cuda"
    dtype: str = "bfloat16"
    with_hf: bool = True
    profile_batch: int = 16  # the decode step profiled (first model)


@dataclass
class DecodeRow:
    model: str
    batch: int
    tokenmill_tok_s: float
    hf_tok_s: float | None


@dataclass
class Roofline:
    model: str
    ms_per_token: float
    bytes_per_token: int
    copy_gb_s: float  # device-to-device copy, bytes read + written, this run
    nominal_gb_s: float | None

    @property
    def achieved_gb_s(self) -> float:
        return self.bytes_per_token / self.ms_per_token / 1e6

    @property
    def fraction(self) -> float:
        return self.achieved_gb_s / self.copy_gb_s


@dataclass
class GpuBenchResult:
    device_name: str
    software: str
    rows: list[DecodeRow] = field(default_factory=list)
    rooflines: list[Roofline] = field(default_factory=list)
    profile: list[tuple[str, float, int]] = field(default_factory=list)  # kernel, GPU ms, calls
    profile_step_ms: float | None = None


def model_path(name: str) -> str:
    """A model config's random-weight checkpoint, the default model, or a path as given."""
    from tokenmill.bench.model_configs import cached_checkpoint
    from tokenmill.model.default_model import default_model_path

    if name == DEFAULT_MODEL:
        return str(default_model_path())
    return name if Path(name).exists() else str(cached_checkpoint(name))


def run_gpu_bench(spec: GpuBenchSpec, log: Log = print) -> GpuBenchResult:
    import torch

    dev = torch.device(spec.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = GpuBenchResult(name, f"torch {torch.__version__}, {_triton_version()}")
    copy_gb_s = copy_bandwidth_gb_s(dev)
    log(f"{name}: device-to-device copy {copy_gb_s:.0f} GB/s")
    for model in spec.models:
        path = model_path(model)
        for batch in spec.batches:
            row = DecodeRow(model, batch, _tok_s(spec, path, "tokenmill", batch),
                            _tok_s(spec, path, "hf", batch) if spec.with_hf else None)
            ratio = f", {row.tokenmill_tok_s / row.hf_tok_s:.2f}x transformers" if row.hf_tok_s else ""
            log(f"{model} batch {batch}: {row.tokenmill_tok_s:,.0f} tok/s{ratio}")
            result.rows.append(row)
        result.rooflines.append(roofline(spec, model, path, copy_gb_s, _nominal(name)))
        r = result.rooflines[-1]
        log(f"{model} batch 1: {r.ms_per_token:.3f} ms/token, {r.achieved_gb_s:,.0f} GB/s = {r.fraction:.0%} of copy")
    result.profile, result.profile_step_ms = profile_decode_step(spec, model_path(spec.models[0]))
    return result


def _tok_s(spec: GpuBenchSpec, path: str, backend: str, batch: int) -> float:
    """Output tokens per second of `batch` requests at once, end to end (prefill included)."""
    import gc

    tp = ThroughputSpec(path, backend, num_prompts=batch, input_len=spec.input_len, output_len=spec.output_len,
                        dtype=spec.dtype, max_num_seqs=batch, device=spec.device,
                        max_num_batched_tokens=max(2048, batch * spec.input_len))
    tok_s = run_throughput(tp).output_tokens_per_s
    gc.collect()  # the run's engine or model, before the next one takes the memory
    _empty_cache(spec.device)
    return tok_s


def _empty_cache(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "no triton"
    return f"triton {triton.__version__}"


def _nominal(device_name: str) -> float | None:
    words = device_name.replace("-", " ").split()
    return next((v for k, v in NOMINAL_GB_S.items() if k in words), None)


def copy_bandwidth_gb_s(device: Any, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * size_bytes * repeats / (time.perf_counter() - start) / 1e9


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def roofline(spec: GpuBenchSpec, model: str, path: str, copy_gb_s: float, nominal: float | None) -> Roofline:
    """Batch-1 decode time per token (a long generation minus a one-token one) against the
    bytes each token reads: every weight once (the input embedding only its row) and the
    request's K/V at the mean context."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(path, dtype=spec.dtype, device=spec.device, max_num_seqs=1,
              max_model_len=spec.input_len + spec.output_len + 8)
    prompt = [{"prompt_token_ids": list(range(10, 10 + spec.input_len))}]

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(spec.output_len)  # warm-up
    one = min(timed(1) for _ in range(3))
    full = min(timed(spec.output_len) for _ in range(3))
    ms_per_token = (full - one) / (spec.output_len - 1) * 1e3
    return Roofline(model, ms_per_token, decode_bytes_per_token(llm, spec.input_len + spec.output_len // 2),
                    copy_gb_s, nominal)


def decode_bytes_per_token(llm: Any, context_len: int) -> int:
    """Bytes one decode token reads: every weight as the model holds it (plain, packed for
    the CPU, or stored blocks; a tied embedding once, through the LM head; an untied
    input embedding not at all: one row) and the K/V of `context_len` tokens."""
    from tokenmill.model.layers.embedding import Embedding
    from tokenmill.model.layers.linear import Linear

    seen: dict[int, int] = {}  # id -> bytes (a tied weight is one tensor: counted once)

    def add(t: Any) -> None:
        if t is not None:
            seen[id(t)] = t.numel() * t.element_size()

    for module in llm.engine.runner.model.modules():
        if isinstance(module, Linear):
            add(module.weight if module.weight is not None else module._packed)
            add(module.bias)
            for _, part in module.stored:
                add(part.blocks)
        elif not isinstance(module, Embedding):
            for p in module.parameters(recurse=False):
                add(p)
    m, dtype = llm.config.model, llm.config.dtype
    kv = 2 * m.num_layers * m.num_kv_heads * m.head_dim * dtype.itemsize * context_len
    return sum(seen.values()) + kv


def profile_decode_step(spec: GpuBenchSpec, path: str) -> tuple[list[tuple[str, float, int]], float]:
    """GPU time per kernel in one decode step of `profile_batch` requests (prefills done)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tokenmill import LLM, SamplingParams
    from tokenmill.engine.request import EngineCoreRequest

    batch = spec.profile_batch
    llm = LLM(path, dtype=spec.dtype, device=spec.device, max_num_seqs=batch,
              max_model_len=spec.input_len + spec.output_len + 8,
              max_num_batched_tokens=max(2048, batch * spec.input_len))
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
    for i in range(batch):
        engine.add_request(EngineCoreRequest(f"p{i}", list(range(10 + i, 10 + i + spec.input_len)), params))
    for _ in range(4):  # the prefills, then decode steps to warm up
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(spec.device).type == "cuda" else [])
    _sync(spec.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        engine.step()
        _sync(spec.device)
    step_ms = (time.perf_counter() - start) * 1e3
    rows = []
    for e in prof.key_averages():
        gpu_us = getattr(e, "device_time_total", 0.0) if e.device_type.name == "CUDA" else 0.0
        if gpu_us:
            rows.append((e.key, gpu_us / 1e3, e.count))
    rows.sort(key=lambda r: -r[1])
    engine.abort_requests([f"p{i}" for i in range(batch)])
    top = rows[:12]
    if len(rows) > len(top):
        top.append(("(the other kernels)", sum(ms for _, ms, _ in rows[12:]), sum(n for _, _, n in rows[12:])))
    return top, step_ms


def command_line(spec: GpuBenchSpec, output: str | None) -> str:
    default = GpuBenchSpec()
    args = ["tokenmill", "bench", "gpu"] + (["--output", output] if output else [])
    if spec.models != default.models:
        args += ["--models", ",".join(spec.models)]
    if spec.batches != default.batches:
        args += ["--batches", ",".join(map(str, spec.batches))]
    if spec.input_len != default.input_len:
        args += ["--input-len", str(spec.input_len)]
    if spec.output_len != default.output_len:
        args += ["--output-len", str(spec.output_len)]
    if not spec.with_hf:
        args.append("--no-hf")
    if spec.device != default.device:
        args += ["--device", spec.device]
    return shlex.join(args)


def render_markdown(spec: GpuBenchSpec, result: GpuBenchResult, command: str) -> str:
    lines = [MARK_BEGIN, f"Measured on {result.device_name} ({result.software}), {spec.dtype}, "
             f"{spec.input_len} tokens in / {spec.output_len} out per request, all of a batch at once "
             f"(output tokens over the whole run, prefill included), with `{command}`:", ""]
    lines.append(markdown_table(
        ["model", "batch", "tokenmill output tok/s", "transformers output tok/s", "tokenmill / transformers"],
        [[r.model, str(r.batch), f"{r.tokenmill_tok_s:,.0f}", f"{r.hf_tok_s:,.0f}" if r.hf_tok_s else None,
          f"{r.tokenmill_tok_s / r.hf_tok_s:.2f}x" if r.hf_tok_s else None] for r in result.rows]))
    lines += ["", "Batch-1 decode against the memory-bandwidth roofline (bytes per token: every weight once, "
              "the K/V of the mean context):", ""]
    lines.append(markdown_table(
        ["model", "ms / token", "MB read / token", "achieved GB/s", "of copy bandwidth", "of nominal"],
        [[r.model, f"{r.ms_per_token:.3f}", f"{r.bytes_per_token / 1e6:,.1f}", f"{r.achieved_gb_s:,.0f}",
          f"{r.fraction:.0%} of {r.copy_gb_s:,.0f}",
          f"{r.achieved_gb_s / r.nominal_gb_s:.0%} of {r.nominal_gb_s:,.0f}" if r.nominal_gb_s else None]
         for r in result.rooflines]))
    if result.profile:
        total = sum(ms for _, ms, _ in result.profile)
        lines += ["", f"One decode step of {spec.profile_batch} requests of {spec.models[0]} (torch profiler; "
                  f"the step took {result.profile_step_ms:.2f} ms of wall time), GPU time by kernel:", ""]
        lines.append(markdown_table(
            ["kernel", "GPU ms", "calls", "share"],
            [[k[:70], f"{ms:.3f}", str(n), f"{ms / total:.0%}"] for k, ms, n in result.profile]))
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def write_result(path: Path, block: str) -> None:
    write_marked(path, block, MARK_BEGIN, MARK_END)
