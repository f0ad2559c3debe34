"""Triton kernels: the GPU's twins of the CPU kernels (tokenmill/model/kernels).

Paged decode attention (split-K, GQA), prefill attention over the paged cache, residual
add + RMSNorm, SiLU-and-mul, rotary + KV-cache write, token bitmasks and the sampler's
keyed race, each with a PyTorch reference in model/layers (the tests compare them).
`kernels.for_tensor(x)` returns them for CUDA tensors.

TOKENMILL_GPU_KERNELS selects:
  auto (default)  on CUDA tensors when triton imports (else PyTorch ops, with a warning);
  0               PyTorch ops on the GPU too;
  interpret       also on CPU tensors, through Triton's interpreter (TRITON_INTERPRET=1):
                  how the tests run every kernel, and the whole model, without a GPU. Slow.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenmill.model.gpu_kernels.ops import TritonOps

logger = logging.getLogger(__name__)

ENV_SWITCH = "TOKENMILL_GPU_KERNELS"
_MODES = ("auto", "0", "interpret")


@functools.cache
def mode() -> str:
    """The switch, read once (layers ask per call); tests call `mode.cache_clear()`."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV_SWITCH}={value!r}: use auto, 0 or interpret.")
    return value


def applies(device: torch.device) -> bool:
    """Whether tensors on `device` go to the Triton kernels (if they load)."""
    if device.type == "cuda":
        return mode() != "0"
    return device.type == "cpu" and mode() == "interpret"


def interpreted() -> bool:
    """Whether Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which differs
    from a GPU in two ways the kernels and tests allow for: it rounds float32 to bfloat16
    toward zero (a GPU: to nearest even), and its dot products do not take bfloat16."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ops() -> TritonOps | None:
    """The Triton operators, or None when triton is missing (PyTorch ops run instead)."""
    return _load(mode())


@functools.cache
def _load(how: str) -> TritonOps | None:
    if how == "0":
        return None
    if how == "interpret":
        # Read when a kernel is decorated: set before the kernel modules first import.
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from tokenmill.model.gpu_kernels.ops import TritonOps
    except ImportError as exc:
        logger.warning("Triton kernels unavailable (%s): PyTorch ops run on the GPU, decode will be "
                       "slower. Install tokenmill[cuda].", exc)
        return None
    return TritonOps()
