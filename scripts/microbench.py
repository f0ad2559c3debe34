"""Micro-benchmarks behind the numbers in docs/performance.md.

Each subcommand times the alternatives side by side in one process (interleaved
repetitions), so the ratios hold even when absolute times drift:

    python scripts/microbench.py gemm        # bf16 vs fp32 GEMM throughput by row count
    python scripts/microbench.py linear      # F.linear vs fused vs oneDNN-packed, one layer
    python scripts/microbench.py attention   # decode attention: SDPA vs batched matmuls
    python scripts/microbench.py rotary      # rotate_half vs roll
    python scripts/microbench.py step        # where a decode step's time goes (cProfile)
    python scripts/microbench.py kernels     # decode steps with the CPU kernels vs without
    python scripts/microbench.py elementwise # each elementwise kernel vs the ops it replaces
    python scripts/microbench.py bandwidth   # reading a step's weights: sum vs packed GEMV
    python scripts/microbench.py threads     # decode steps on the loading thread vs another
    python scripts/microbench.py sampler     # random sampling of 64 rows: kernel vs PyTorch ops
    python scripts/microbench.py prefill     # one 1,024-token prompt through the engine
    python scripts/microbench.py dtypes      # decode steps in float32, bfloat16 and float16
    python scripts/microbench.py quant       # Q4_1 / bf16 weights (rows as stored, by 8) vs float32

The kernel benchmarks time every instruction-set path this CPU runs (generic, avx2,
avx512) beside the PyTorch ops. `--dtype` sets the dtype of the layer and kernel
benchmarks (default: what `--dtype auto` picks on this CPU).

Shapes are SmolLM2-135M's (hidden 576, 9 heads, 3 KV heads, head_dim 64, intermediate
1536, vocab 49152). `step` and `prefill` use the random-weight checkpoint of
`tokenmill bench throughput --model-config smollm2-135m` (built on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The dtype the kernel and layer benchmarks run in: --dtype, default what `auto` picks here.
DTYPE = torch.float32
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152


def compare(fns: dict[str, Callable[[], object]], reps: int = 5, calls: int = 20) -> dict[str, float]:
    """Mean ms per call of each fn, repetitions interleaved so drift hits all alike."""
    total = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            # An _OnIsa switches paths once per timed block, not per call (a switch costs
            # ~15 us, as much as a one-row elementwise kernel).
            with fn.selected() if isinstance(fn, _OnIsa) else contextlib.nullcontext():
                body = fn.fn if isinstance(fn, _OnIsa) else fn
                t = time.perf_counter()
                for _ in range(calls):
                    body()
                total[name] += (time.perf_counter() - t) / calls
    return {name: t / reps * 1e3 for name, t in total.items()}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class _OnIsa:
    """fn run on one instruction-set path of the CPU kernels."""

    isa: str
    fn: Callable[[], object]

    def selected(self) -> contextlib.AbstractContextManager:
        from tokenmill.model import kernels

        return kernels.use_isa(self.isa)

    def __call__(self) -> object:
        with self.selected():
            return self.fn()


def _per_isa(label: str, fn: Callable[[], object]) -> dict[str, Callable[[], object]]:
    """fn on each instruction-set path of the CPU kernels this CPU runs ({} without them)."""
    from tokenmill.model import kernels

    return {f"{label} ({isa})": _OnIsa(isa, fn) for isa in kernels.available_isas()}


def show(title: str, ms: dict[str, float]) -> None:
    base = next(iter(ms.values()))
    print(title)
    for name, t in ms.items():
        print(f"  {name:<28} {t:9.3f} ms   x{base / t:5.2f} vs first")


def cmd_gemm() -> None:
    for rows in (1, 16, 64, 512):
        _gemm(rows)


def _gemm(rows: int) -> None:
    w32, x32 = torch.randn(INTER, HIDDEN), torch.randn(rows, HIDDEN)
    w, x = w32.to(torch.bfloat16), x32.to(torch.bfloat16)
    ms = compare({"bf16": lambda: F.linear(x, w), "fp32": lambda: F.linear(x32, w32)})
    gflop = 2 * rows * HIDDEN * INTER / 1e9
    print(f"{rows:4d} rows: bf16 {gflop / ms['bf16'] * 1e3:6.1f} GFLOP/s, fp32 {gflop / ms['fp32'] * 1e3:6.1f} GFLOP/s")


def cmd_linear() -> None:
    """The four projections of one decoder layer, three ways."""
    w = {k: torch.randn(*s, dtype=DTYPE) for k, s in dict(
        q=(HIDDEN, HIDDEN), k=(KV_HEADS * HEAD_DIM, HIDDEN), v=(KV_HEADS * HEAD_DIM, HIDDEN),
        o=(HIDDEN, HIDDEN), g=(INTER, HIDDEN), u=(INTER, HIDDEN), d=(HIDDEN, INTER)).items()}
    from tokenmill.model.layers.linear import onednn_packs

    qkv, gate_up = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w["g"], w["u"]])
    pack = torch.ops.mkldnn._reorder_linear_weight
    packed = ({k: pack(t, None) for k, t in dict(qkv=qkv, o=w["o"], gu=gate_up, d=w["d"]).items()}
              if onednn_packs(DTYPE) else None)
    for rows in (1, 64):
        _linear_layer(rows, w, qkv, gate_up, packed)


def _linear_layer(rows: int, w: dict, qkv: torch.Tensor, gate_up: torch.Tensor, packed: dict) -> None:
    lp = torch.ops.mkldnn._linear_pointwise
    x, h = torch.randn(rows, HIDDEN, dtype=DTYPE), torch.randn(rows, INTER, dtype=DTYPE)
    fns = {
        "7 x F.linear": lambda: [F.linear(x, w[k]) for k in "qkvogu"] + [F.linear(h, w["d"])],
        "4 x F.linear (fused)": lambda: [F.linear(x, qkv), F.linear(x, w["o"]), F.linear(x, gate_up), F.linear(h, w["d"])],
    }
    if packed is not None:  # oneDNN packs float32 anywhere, 16-bit types only with AVX-512
        fns["4 x oneDNN packed"] = lambda: [lp(x, packed["qkv"], None, "none", [], ""),
                                            lp(x, packed["o"], None, "none", [], ""),
                                            lp(x, packed["gu"], None, "none", [], ""), lp(h, packed["d"], None, "none", [], "")]
    show(f"one layer's linears, {rows} rows, {_name(DTYPE)}", compare(fns))


def cmd_attention(batch: int = 64, context: int = 256, block_size: int = 16) -> None:
    """Decode attention of `batch` requests over `context` cached tokens each."""
    group, num_blocks = HEADS // KV_HEADS, 4096
    per_req = context // block_size
    tables = torch.stack([torch.randperm(num_blocks)[:per_req] for _ in range(batch)])
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE)
    mask_bool = torch.ones(batch, context, dtype=torch.bool)
    mask = torch.zeros(batch, context)
    token_major = torch.randn(num_blocks, block_size, KV_HEADS, HEAD_DIM, dtype=DTYPE)  # K (and V)
    head_major = torch.randn(2, KV_HEADS, num_blocks, block_size, HEAD_DIM, dtype=DTYPE)

    def sdpa():
        k = token_major[tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
        v = token_major[tables].flatten(1, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask_bool[:, None, None, :], enable_gqa=True)

    def bmm_token_major():
        k = token_major[tables].flatten(1, 2).transpose(1, 2)
        v = token_major[tables].flatten(1, 2).transpose(1, 2)
        s = torch.matmul(q.view(batch, KV_HEADS, group, HEAD_DIM), k.transpose(-1, -2)).float()
        p = torch.softmax(s.mul_(HEAD_DIM**-0.5).add_(mask[:, None, None, :]), -1).to(DTYPE)
        return torch.matmul(p, v)

    def bmm_head_major():  # what tokenmill does (layers/attention.py)
        kv = head_major[:, :, tables].flatten(3, 4).flatten(1, 2)  # [2, Hkv * B, L, D]
        qg = q.view(batch, KV_HEADS, group, HEAD_DIM).permute(1, 0, 3, 2).reshape(-1, HEAD_DIM, group)
        s = torch.bmm(kv[0], qg).float().view(KV_HEADS, batch, context, group)
        p = torch.softmax(s.mul_(HEAD_DIM**-0.5).add_(mask[None, :, :, None]), dim=2).to(DTYPE)
        return torch.bmm(p.view(-1, context, group).transpose(1, 2), kv[1])

    def bmm_q_kt():  # the other orientation: BLAS copies the transposed K
        kv = head_major[:, :, tables].flatten(3, 4).flatten(1, 2)
        qg = q.view(batch, KV_HEADS, group, HEAD_DIM).transpose(0, 1).reshape(-1, group, HEAD_DIM)
        s = torch.bmm(qg, kv[0].transpose(1, 2)).float().view(KV_HEADS, batch, group, context)
        p = torch.softmax(s.mul_(HEAD_DIM**-0.5).add_(mask[None, :, None, :]), dim=-1).to(DTYPE)
        return torch.bmm(p.view(-1, group, context), kv[1])

    def bmm_fp32():  # the head-major path computed in float32
        kv = head_major[:, :, tables].flatten(3, 4).flatten(1, 2).float()
        qg = q.float().view(batch, KV_HEADS, group, HEAD_DIM).permute(1, 0, 3, 2).reshape(-1, HEAD_DIM, group)
        s = torch.bmm(kv[0], qg).view(KV_HEADS, batch, context, group)
        p = torch.softmax(s.mul_(HEAD_DIM**-0.5).add_(mask[None, :, :, None]), dim=2)
        return torch.bmm(p.view(-1, context, group).transpose(1, 2), kv[1])

    from tokenmill.model.kernels import cpu_kernels

    ops, out = cpu_kernels(), torch.empty_like(q)
    tables32, seq_lens = tables.to(torch.int32), torch.full((batch,), context, dtype=torch.int32)
    kernel = _per_isa("kernel", lambda: ops.paged_decode_attention(out, q, head_major, tables32, seq_lens,
                                                                    HEAD_DIM**-0.5))
    show(f"decode attention, {batch} requests x {context} tokens, one layer, {_name(DTYPE)}", compare({
        "SDPA + padding mask": sdpa,
        "bmm, token-major cache": bmm_token_major,
        "bmm, head-major cache": bmm_head_major,
        "bmm, head-major, q @ K^T": bmm_q_kt,
        "bmm, head-major, float32": bmm_fp32,
        "gather only (head-major)": lambda: head_major[:, :, tables],
        **kernel,
    }))


def cmd_rotary() -> None:
    for tokens in (1, 64):
        _rotary(tokens)


def _rotary(tokens: int) -> None:
    x = torch.randn(tokens, HEADS + KV_HEADS, HEAD_DIM, dtype=DTYPE)
    cos, sin = torch.randn(tokens, 1, HEAD_DIM, dtype=DTYPE), torch.randn(tokens, 1, HEAD_DIM, dtype=DTYPE)
    half = HEAD_DIM // 2
    show(f"rotary, {tokens} tokens", compare({
        "rotate_half (cat)": lambda: x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin,
        "roll + signed sin": lambda: x * cos + x.roll(half, -1) * sin,
    }, calls=500))


def _engine(**kwargs):
    from tokenmill import LLM
    from tokenmill.bench.model_configs import cached_checkpoint

    kwargs.setdefault("dtype", DTYPE)
    return LLM(str(cached_checkpoint("smollm2-135m")), **kwargs)


def _decoding_engine(batch: int, steps: int, dtype: torch.dtype | None = None):
    """An engine with `batch` 128-token requests admitted and prefilled, ready to decode."""
    from tokenmill import SamplingParams

    llm = _engine(max_model_len=512, max_num_seqs=batch, max_num_batched_tokens=batch * 128, dtype=dtype or DTYPE)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for _ in range(batch):
        llm._add_request(None, torch.randint(10, 4000, (128,), generator=g).tolist(), params)
    llm.engine.step()  # the whole batch's prefill in one step
    return llm


def cmd_step(batch: int = 64, steps: int = 10) -> None:
    """Time per function over `steps` decode steps after a batch's prefill. cProfile, not
    torch.profiler: it also sees the compiled kernels, which are not ATen ops."""
    import cProfile
    import pstats

    llm = _decoding_engine(batch, steps)
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.runcall(lambda: [llm.engine.step() for _ in range(steps)])
    print(f"{batch} requests (context ~130), {steps} decode steps: {(time.perf_counter() - t) / steps * 1e3:.1f} ms "
          f"per step under the profiler; divide tottime by {steps} for per-step time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def _with_kernels(use_kernels: bool, fn: Callable[[], object]) -> object:
    """fn() with the compiled CPU kernels on or off (layers look them up on every call)."""
    from tokenmill.model import kernels

    saved = kernels.cpu_kernels
    if not use_kernels:
        kernels.cpu_kernels = lambda: None
    try:
        return fn()
    finally:
        kernels.cpu_kernels = saved


def cmd_kernels(steps: int = 20) -> None:
    """Decode step time with the PyTorch fallback and with each instruction-set path of the
    compiled CPU kernels, two engines in one process, steps interleaved."""
    from tokenmill.model import kernels

    if kernels.cpu_kernels() is None:
        raise SystemExit("the CPU kernels could not be built here; nothing to compare")
    for batch in (1, 64):
        fast = _decoding_engine(batch, (1 + len(kernels.available_isas())) * steps)
        slow = _with_kernels(False, functools.partial(_decoding_engine, batch, 2 * steps))
        ms = compare({"PyTorch ops (fallback)": functools.partial(_with_kernels, False, slow.engine.step),
                      **_per_isa("CPU kernels", fast.engine.step)}, reps=steps // 2, calls=2)
        show(f"one decode step, {batch} requests, {_name(DTYPE)}", ms)


def cmd_elementwise() -> None:
    """Each elementwise kernel against the PyTorch ops it replaces (64 rows and 1 row)."""
    from tokenmill.model.kernels import cpu_kernels

    ops = cpu_kernels()
    if ops is None:
        raise SystemExit("the CPU kernels could not be built here; nothing to compare")
    for rows in (64, 1):
        _elementwise(ops, rows)


def _elementwise(ops, rows: int) -> None:
    from tokenmill.model.layers.attention import AttentionMetadata, write_kv
    from tokenmill.model.layers.norm import RMSNorm
    from tokenmill.model.layers.rotary import RotaryEmbedding, apply_rotary

    norm = RMSNorm(HIDDEN, 1e-5).to(DTYPE)
    x, r = torch.randn(rows, HIDDEN, dtype=DTYPE), torch.randn(rows, HIDDEN, dtype=DTYPE)
    gate_up, h = torch.randn(rows, 2 * INTER, dtype=DTYPE), torch.empty(rows, INTER, dtype=DTYPE)
    gate, up = gate_up.split(INTER, dim=-1)
    heads = HEADS + 2 * KV_HEADS
    qkv = torch.randn(rows, heads * HEAD_DIM, dtype=DTYPE)
    cos_sin = RotaryEmbedding(HEAD_DIM, 4096, 10000.0).lookup(torch.arange(rows) + 100, DTYPE)
    cache = torch.zeros(2, KV_HEADS, 256, 16, HEAD_DIM, dtype=DTYPE)
    slots = torch.randperm(256 * 16)[:rows]
    meta = AttentionMetadata(slots, 0, None, None, None, [])

    def rotary_ops() -> None:
        qk = apply_rotary(qkv.view(rows, heads, HEAD_DIM)[:, : HEADS + KV_HEADS], cos_sin)
        write_kv(cache, qk[:, HEADS:], qkv.view(rows, heads, HEAD_DIM)[:, HEADS + KV_HEADS :], meta)

    dt = _name(DTYPE)
    show(f"add + RMSNorm, {rows} rows, {dt}", compare({
        "PyTorch ops": lambda: norm._norm(x + r),
        **_per_isa("kernel", lambda: ops.add_rms_norm(x, r, norm.weight, 1e-5))}, calls=200))
    show(f"silu * up, {rows} rows, {dt}", compare({
        "PyTorch ops": lambda: F.silu(gate) * up,
        **_per_isa("kernel", lambda: ops.silu_and_mul(h, gate_up))}, calls=200))
    show(f"rotary + KV write, {rows} tokens, {dt}", compare({
        "PyTorch ops": rotary_ops,
        **_per_isa("kernel", lambda: ops.rotary_and_cache(qkv, *cos_sin, cache, slots, HEADS))}, calls=200))


def cmd_bandwidth() -> None:
    """How fast the weights of one decode step can be read: a plain reduction over 283 MB,
    oneDNN's packed GEMV over the same bytes as one matrix, and as the 120 per-layer
    matrices (30 layers x qkv, o, gate_up, down) a one-stream step multiplies."""
    pack, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    shapes = [(HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN),
              (HIDDEN, INTER)] * 30
    layers = [(pack(torch.randn(*s, dtype=DTYPE), None), torch.randn(1, s[1], dtype=DTYPE)) for s in shapes]
    layer_bytes = sum(o * i * 2 for o, i in shapes)
    big = torch.randn(layer_bytes // 2 // HIDDEN, HIDDEN, dtype=DTYPE)
    big_packed, x = pack(big, None), torch.randn(1, HIDDEN, dtype=DTYPE)
    ms = compare({"sum over the bytes": big.sum,
                  "packed GEMV, one matrix": lambda: linear(x, big_packed, None, "none", [], ""),
                  "packed GEMV, 120 matrices": lambda: [linear(v, w, None, "none", [], "") for w, v in layers]},
                 reps=5, calls=3)
    print(f"reading {layer_bytes / 1e6:.0f} MB of bf16 weights")
    for name, t in ms.items():
        print(f"  {name:<28} {t:7.2f} ms  {layer_bytes / t / 1e6:5.1f} GB/s")


def cmd_threads(steps: int = 30) -> None:
    """Why AsyncLLM loads the model on a thread that exits: one-stream decode steps on
    the thread that loaded the model vs on another thread, as the server's engine thread."""
    import threading

    def timed(label: str, llm) -> None:
        t = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        print(f"  {label:<58} {(time.perf_counter() - t) / steps * 1e3:6.1f} ms per step")

    def elsewhere(fn, *args) -> None:
        thread = threading.Thread(target=fn, args=args)
        thread.start()
        thread.join()

    print("one decode step, 1 request")
    # First, while the main thread has run no parallel work (as in the server):
    box = {}
    elsewhere(lambda: box.setdefault("llm", _decoding_engine(1, 8 * steps)))  # that thread exits
    elsewhere(timed, "loaded on a thread that exited, stepped on another", box["llm"])
    # Then as before the fix: the main thread loads a model, so it owns an OpenMP pool.
    llm = _decoding_engine(1, 8 * steps)
    timed("loaded on the main thread, stepped there", llm)
    elsewhere(timed, "loaded on the main thread, stepped on another", llm)
    elsewhere(timed, "the first model again, now that the main thread has a pool", box["llm"])


def cmd_sampler(rows: int = 64) -> None:
    """One random-sampling step (temperature 1) of `rows` requests over the full vocab."""
    from tokenmill import SamplingParams
    from tokenmill.model.layers.sampler import Sampler, SamplingState

    logits = torch.randn(rows, VOCAB)
    states = [SamplingState(SamplingParams(temperature=1.0), None, [1], []) for _ in range(rows)]
    def sample() -> None:
        Sampler().sample(logits.clone(), states)

    ms = compare({"PyTorch ops (same race)": functools.partial(_with_kernels, False, sample),
                  **_per_isa("exponential-race kernel", sample)})
    show(f"random sampling, {rows} rows x {VOCAB} tokens", ms)


def cmd_dtypes(steps: int = 16) -> None:
    """The basis of `--dtype auto`: decode step time of the same checkpoint in float32,
    bfloat16 and float16 (with this CPU's kernels), engines side by side in one process."""
    for batch in (1, 64):
        engines = {_name(dt): _decoding_engine(batch, 2 * steps, dt)
                   for dt in (torch.float32, torch.bfloat16, torch.float16)}
        show(f"one decode step, {batch} requests", compare({k: e.engine.step for k, e in engines.items()},
                                                        reps=steps // 2, calls=2))


def cmd_quant(num_matrices: int = 8) -> None:
    """The real model's matrix shapes in Q4_1 (as its GGUF file stores them): multiplied in
    integers against int8 activations (quant_matmul; rows as stored, and interleaved by 8
    as the model runs them), decoded to float32 inside the product (weight_matmul), as
    bfloat16 interleaved by 8, and as float32 weights (oneDNN). Several distinct matrices, so weights
    come from memory as in a model, not from the L3 cache."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    from tokenmill.model.kernels import cpu_kernels
    from tokenmill.model.layers.linear import onednn_packs

    ops = cpu_kernels()
    if ops is None:
        raise SystemExit("the CPU kernels could not be built here; nothing to compare")
    rng = np.random.default_rng(0)
    for rows, cols in ((HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)):
        weights = [rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(num_matrices)]
        blocks = [torch.from_numpy(quantize(w, gguf.GGMLQuantizationType.Q4_1).view(np.uint8).reshape(rows, -1).copy())
                  for w in weights]
        f32 = [torch.from_numpy(w) for w in weights]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in f32] if onednn_packs(torch.float32) else None
        q4_1, bf16 = int(gguf.GGMLQuantizationType.Q4_1), int(gguf.GGMLQuantizationType.BF16)
        interleaved = {"Q4_1": [ops.repack_rows8(b, q4_1) for b in blocks],
                       "bf16": [ops.repack_rows8(w.bfloat16().view(torch.uint8), bf16) for w in f32]}
        for tokens in (1, 4, 16, 64):
            _quant_shape(ops, f32, packed, blocks, interleaved, tokens)


def _quant_shape(ops, f32: list, packed: list | None, blocks: list, interleaved: dict, tokens: int) -> None:
    import gguf

    q4_1, bf16 = int(gguf.GGMLQuantizationType.Q4_1), int(gguf.GGMLQuantizationType.BF16)
    (rows, cols), n = f32[0].shape, len(f32)
    x, out = torch.randn(tokens, cols), torch.empty(tokens, rows)

    def int8() -> None:
        xq, xd, xs = ops.quantize_activations(x)
        for b in blocks:
            ops.quant_matmul(out, xq, xd, xs, b, q4_1)

    def int8_rows8() -> None:  # what the model runs: rows interleaved by 8, quantization inside
        for b in interleaved["Q4_1"]:
            ops.stored_matmul(out, x, b, q4_1, True)

    def bf16_rows8() -> None:
        for b in interleaved["bf16"]:
            ops.stored_matmul(out, x, b, bf16, True)

    fns = {"float32 F.linear": lambda: [F.linear(x, w) for w in f32]}
    if packed is not None:
        fns["float32 oneDNN packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                                for w in packed]
    fns["Q4_1, float activations"] = lambda: [ops.weight_matmul(out, x, b, q4_1) for b in blocks]
    fns.update(_per_isa("Q4_1, int8 activations", int8))
    fns.update(_per_isa("Q4_1 rows by 8, int8 activations", int8_rows8))
    fns.update(_per_isa("bfloat16 rows by 8", bf16_rows8))
    show(f"{n} matrices {rows}x{cols}, {tokens} tokens", compare(fns, reps=3, calls=5))


def cmd_prefill(prompt_len: int = 1024) -> None:
    from tokenmill import SamplingParams

    llm = _engine(max_model_len=2 * prompt_len, enable_prefix_caching=False)
    ids = torch.randint(10, 4000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    run = lambda: llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)  # noqa: E731
    ms = compare({"prefill": run}, reps=3, calls=1)["prefill"]
    print(f"prefill of {prompt_len} tokens: {ms:.0f} ms = {prompt_len / ms * 1e3:.0f} tokens/s")


def main() -> None:
    commands = {"gemm": cmd_gemm, "linear": cmd_linear, "attention": cmd_attention, "rotary": cmd_rotary,
                "step": cmd_step, "kernels": cmd_kernels, "elementwise": cmd_elementwise,
                "bandwidth": cmd_bandwidth, "threads": cmd_threads,
                "sampler": cmd_sampler, "prefill": cmd_prefill, "dtypes": cmd_dtypes, "quant": cmd_quant}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=commands)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the layer and kernel benchmarks (default: what auto picks on this CPU)")
    args = parser.parse_args()
    from tokenmill.config import resolve_dtype

    global DTYPE
    DTYPE = resolve_dtype(args.dtype, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.inference_mode():
        commands[args.command]()


if __name__ == "__main__":
    main()
