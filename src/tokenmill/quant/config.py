"""`quantization_config` of a checkpoint's config.json: read and validated (loading), or
built (writing). Refusals name the file and the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What `tokenmill quantize` writes for int8 (no ecosystem layout is both simple and widely
# read for weight-only int8; see docs/quantization.md).
TOKENMILL_INT8 = {"quant_method": "tokenmill", "bits": 8, "group_size": -1, "sym": True, "format": "int8-per-channel"}


def awq_config(group_size: int) -> dict[str, Any]:
    """The quantization_config AutoAWQ writes for a 4-bit gemm checkpoint."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's integer weight format, as far as loading needs it."""

    method: str  # "awq" | "gptq" | "tokenmill"
    bits: int
    group_size: int  # -1: one group spans a whole row
    zero_point: bool = True  # AWQ: qzeros stored (else codes centred on 8)
    v1_zeros: bool = False  # GPTQ checkpoint_format "gptq": stored zero points are z - 1
    source: str = ""  # the file it was read from, for messages

    def group_size_for(self, num_cols: int) -> int:
        return num_cols if self.group_size == -1 else self.group_size


def _refuse(path: Path, key: str, value: Any, detail: str) -> ValueError:
    return ValueError(f"{path}: unsupported quantization_config.{key}={value!r} ({detail}); tokenmill loads AWQ "
                      "(4-bit, version gemm), GPTQ (4 or 8-bit, checkpoint_format gptq or gptq_v2, int32 packing) "
                      "and its own int8 checkpoints.")


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's quantization_config (config.json, else GPTQ's quantize_config.json), or
    None for a float checkpoint.

    Raises:
        ValueError: a method, bit width, packing or option tokenmill cannot load (names the key).
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    raw = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if raw is None and (model_dir / "quantize_config.json").is_file():
        path = model_dir / "quantize_config.json"
        raw = {"quant_method": "gptq", **json.loads(path.read_text())}
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _refuse(path, "", raw, "not an object")
    method = str(raw.get("quant_method", "")).lower()
    bits = raw.get("bits", raw.get("w_bit"))
    group_size = raw.get("group_size", raw.get("q_group_size", -1))
    if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise _refuse(path, "group_size", group_size, "a positive group size or -1")
    if method == "awq":
        if bits != 4:
            raise _refuse(path, "bits", bits, "AWQ checkpoints are 4-bit")
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse(path, "version", raw.get("version"), "only the gemm packing is read")
        return QuantConfig("awq", 4, group_size, zero_point=bool(raw.get("zero_point", True)), source=str(path))
    if method == "gptq":
        if bits not in (4, 8):
            raise _refuse(path, "bits", bits, "4 or 8-bit GPTQ")
        fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
        if raw.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
            key = "is_marlin_format" if raw.get("is_marlin_format") else "checkpoint_format"
            raise _refuse(path, key, raw.get(key), "a kernel-specific repacking")
        if raw.get("pack_dtype", "int32") != "int32":
            raise _refuse(path, "pack_dtype", raw.get("pack_dtype"), "only int32 words are read")
        return QuantConfig("gptq", bits, group_size, v1_zeros=fmt == "gptq", source=str(path))
    if method == "tokenmill":
        if bits != 8:
            raise _refuse(path, "bits", bits, "tokenmill's own layout is int8 (its int4 is written as AWQ)")
        return QuantConfig("tokenmill", 8, -1, zero_point=False, source=str(path))
    raise _refuse(path, "quant_method", raw.get("quant_method"), "an unknown method")
