"""Fingerprints of the machine and software a run measured, so history can be keyed by SKU.

Read from /proc and `nvidia-smi` without importing torch (that would add seconds to every
`bench serve`); torch's own version is read from its package metadata. When the server is on
another machine, this describes the client: pass --hardware-sku to name the server's SKU.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import tokenmill.cpu
from tokenmill.cpu import cpu_flags

# ISA features that change LLM kernel speed, by the names /proc/cpuinfo uses.
_ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "sve", "sve2", "bf16", "i8mm",  # Arm
)


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs via nvidia-smi; empty when there is none or the tool is missing."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, mem_mib, driver = (p.strip() for p in line.split(","))
        gpus.append({"name": name, "memory_bytes": int(float(mem_mib)) * 2**20, "driver": driver})
    return gpus


def hardware_fingerprint(sku: str | None = None) -> dict[str, Any]:
    """Describe this machine.

    Args:
        sku: a name to file the run under (e.g. "aws-g6.xlarge"); None derives one from the
            GPUs, or the CPU model and core count.

    Returns:
        {"sku", "cpu_model", "cpu_cores", "memory_bytes", "isa_flags", "gpus", "machine", "os"}.
    """
    flags = cpu_flags()
    cpu_model = tokenmill.cpu.cpu_model()
    cores = os.cpu_count() or 0
    gpus = _gpus()
    if sku is None:
        if gpus:
            sku = f"{len(gpus)}x {gpus[0]['name']}"
        else:
            # The ISA class too: one model name covers CPUs with and without AVX-512.
            sku = f"{cpu_model} x{cores} {tokenmill.cpu.isa_class()}"
    return {
        "sku": sku,
        "cpu_model": cpu_model,
        "cpu_cores": cores,
        "memory_bytes": _memory_bytes(),
        "isa_flags": sorted(f for f in _ISA_FLAGS if f in flags),
        "gpus": gpus,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[3]
    if not (repo / ".git").exists() or not shutil.which("git"):
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def software_fingerprint() -> dict[str, Any]:
    """tokenmill version and git commit (when run from a checkout), torch, python."""
    return {
        "tokenmill": _version("tokenmill"),
        "git_commit": _git_commit(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "python": sys.version.split()[0],
    }
