"""What this CPU is: /proc/cpuinfo, read once, without importing torch.

One place for the CPU facts the engine adapts to (auto dtype, which kernels run) and the
bench lab keys its history by.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Instructions that make bf16 matrix products native rather than emulated.
BF16_MATMUL_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields, keys lower-cased ({} where absent)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key and key not in info:
            info[key] = value.strip()
    return info


def cpu_flags() -> frozenset[str]:
    """Instruction-set flags by /proc/cpuinfo's names (x86 `flags`, Arm `features`)."""
    info = cpuinfo()
    return frozenset((info.get("flags") or info.get("features") or "").split())


def cpu_model() -> str:
    info = cpuinfo()
    return info.get("model name") or info.get("hardware") or platform.processor() or platform.machine()


def has_bf16_matmul() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & BF16_MATMUL_FLAGS)


def isa_class() -> str:
    """The widest instruction-set class that changes kernel speed: amx, avx512_bf16, avx512,
    avx2, or the machine name. Two CPUs of one model name can differ here (cloud
    machines expose different sets), so the bench lab keys its history by it too."""
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512_bf16"), ("avx512f", "avx512"),
                       ("avx2", "avx2")):
        if flag in flags:
            return name
    return platform.machine()
