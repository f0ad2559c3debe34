"""Compiled CPU kernels for the decode hot path, built on first use.

The C++ source (cpu_kernels.cpp) is compiled for this machine's CPU the first time a
model loads on CPU (about half a minute; a C++ compiler is needed) and cached under
~/.cache/tokenmill/kernels (one folder per CPU model and torch installation), so later
starts load it in well under a second. Where it
cannot be built, or with TOKENMILL_CPU_KERNELS=0, the model runs the equivalent
PyTorch ops instead: the same math (decode attention keeps float32 where the ops round
to bfloat16), slower decode steps.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import shutil
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ENV_SWITCH = "TOKENMILL_CPU_KERNELS"


def _build_key() -> str:
    """Short hash of what a build depends on besides the source: the CPU model and flags
    (a build with -march=native for one CPU must never load on another) and the torch
    installation (its headers are in the compile command, so two environments sharing
    one folder would rebuild each other's copy on every switch)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        import platform

        cpu = platform.processor() or platform.machine()
    text = f"{cpu}\n{torch.__version__}\n{Path(torch.__file__).parent}"
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _build_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmill" / "kernels"
    path = root / _build_key()
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled kernel module, or None (PyTorch fallback) with the reason logged once."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("%s=0: CPU kernels disabled, using PyTorch ops.", ENV_SWITCH)
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(shlex.split(compiler)[0] if compiler.strip() else "c++") is None:
        logger.warning("No C++ compiler (%s) found: using PyTorch ops, decode will be slower. Install g++ "
                       "for tokenmill's CPU kernels, or set %s=0 to silence this.", compiler, ENV_SWITCH)
        return None
    try:
        from torch.utils.cpp_extension import load

        build_dir = _build_dir()
        if not any(build_dir.glob("*.so")):
            logger.info("Compiling tokenmill's CPU kernels for this CPU (once, about half a minute)...")
        return load(
            name="tokenmill_cpu_kernels",
            sources=[str(_SOURCE)],
            build_directory=str(build_dir),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a broken toolchain, a read-only home...: run slower, not fail
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("CPU kernels could not be built (%s): using PyTorch ops, decode will be slower. "
                       "Set %s=0 to skip the attempt.", first_line, ENV_SWITCH)
        return None


def for_tensor(t: torch.Tensor) -> ModuleType | None:
    """The kernel module if `t` lives on the CPU and the kernels are built, else None
    (the caller runs its PyTorch ops)."""
    return cpu_kernels() if t.is_cpu else None


def decode_attention_kernel(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether decode attention of this shape can run the compiled kernel."""
    ops = cpu_kernels()
    return (
        ops is not None
        and num_heads // num_kv_heads <= ops.MAX_QUERY_HEADS_PER_KV_HEAD
        and head_dim <= ops.MAX_HEAD_DIM
    )
