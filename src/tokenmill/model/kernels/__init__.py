"""Compiled CPU kernels for the decode hot path (torch.ops.tokenmill.*).

The library in csrc/ holds each kernel three times: a portable generic path (always
built), an AVX2 + FMA + F16C path and an AVX-512 path, written once against a vector
type per instruction set. At load it runs the widest path this CPU supports;
TOKENMILL_CPU_ISA=generic|avx2|avx512 picks a narrower one, and tests run every path the
machine can execute. It is built once by `tokenmill kernels build` (which `make run` and
`make test` call), or else when a model first loads, never inside a request.

TOKENMILL_CPU_KERNELS selects what happens without them:
  auto (default)  build/load them; if that fails, warn once and run PyTorch ops;
  require         a failed build is an error (CI uses this: green means they were tested);
  0               do not use them.
The PyTorch ops compute the same math, so the engine's output does not depend on it
(sampling draws the same tokens for the same seed; see layers/sampler.py).

`for_tensor` is the one place a layer asks for kernels: these for CPU tensors, their Triton
twins (model/gpu_kernels, the same operator names and arguments) for CUDA tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from tokenmill.model import gpu_kernels
from tokenmill.model.kernels.build import KernelBuildError, ensure_built, library_path

logger = logging.getLogger(__name__)

ENV_SWITCH = "TOKENMILL_CPU_KERNELS"
ISA_ENV = "TOKENMILL_CPU_ISA"
_MODES = ("auto", "1", "require", "0")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "ENV_SWITCH", "ISA_ENV", "KernelBuildError", "available_isas", "cpu_kernels", "decode_attention_kernel",
    "for_tensor", "library_path", "mode", "paged_prefill_kernel", "selected_isa", "use_isa",
]


def mode() -> str:
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV_SWITCH}={value!r}: use auto, require or 0.")
    return "auto" if value == "1" else value


@functools.cache
def cpu_kernels() -> Any | None:
    """The kernel operators (torch.ops.tokenmill), or None: PyTorch ops run instead.

    Raises:
        KernelBuildError: the build failed and TOKENMILL_CPU_KERNELS=require.
    """
    how = mode()
    if how == "0":
        logger.info("%s=0: CPU kernels disabled, using PyTorch ops.", ENV_SWITCH)
        return None
    try:
        torch.ops.load_library(str(ensure_built()))
    except (KernelBuildError, OSError) as exc:
        if how == "require":
            raise KernelBuildError(f"{ENV_SWITCH}=require, but the CPU kernels are not available: {exc}") from exc
        logger.warning("CPU kernels unavailable (%s): using PyTorch ops, decode will be slower. "
                       "Set %s=0 to skip the attempt.", exc, ENV_SWITCH)
        return None
    ops = torch.ops.tokenmill
    isa = os.environ.get(ISA_ENV, "").strip()
    if isa:
        ops.set_cpu_isa(isa)  # raises with the list of paths this CPU runs
    return ops


def for_tensor(t: torch.Tensor) -> Any | None:
    """The kernel operators for `t`'s device, or None (the caller runs its PyTorch ops):
    the compiled CPU kernels for a CPU tensor, the Triton kernels for a CUDA tensor (and
    for a CPU tensor under TOKENMILL_GPU_KERNELS=interpret), if `t`'s dtype is one they take."""
    return _ops_for(t.device) if t.dtype in _KERNEL_DTYPES else None


def _ops_for(device: torch.device) -> Any | None:
    if gpu_kernels.applies(device):
        return gpu_kernels.triton_ops()
    return cpu_kernels() if device.type == "cpu" else None


def decode_attention_kernel(device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether decode attention of this shape runs a kernel that reads exactly each row's
    tokens in place (else batched matmuls over whole gathered blocks)."""
    ops = _ops_for(device)
    if ops is None:
        return False
    max_group, max_head_dim = ops.kernel_limits()
    return num_heads // num_kv_heads <= max_group and head_dim <= max_head_dim


def paged_prefill_kernel(device: torch.device) -> bool:
    """Whether prefill chunks on `device` run one Triton launch over the paged cache (else
    SDPA per chunk over its gathered blocks)."""
    return gpu_kernels.applies(device) and gpu_kernels.triton_ops() is not None


def available_isas() -> list[str]:
    """The kernel paths this CPU can run, narrowest first ([] without the kernels)."""
    ops = cpu_kernels()
    return list(ops.cpu_isas()) if ops is not None else []


def selected_isa() -> str | None:
    ops = cpu_kernels()
    return ops.cpu_isa() if ops is not None else None


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernels' `name` path inside the block (tests and micro-benchmarks)."""
    ops = cpu_kernels()
    if ops is None:
        raise KernelBuildError("the CPU kernels are not built")
    before = ops.cpu_isa()
    ops.set_cpu_isa(name)
    try:
        yield
    finally:
        ops.set_cpu_isa(before)
