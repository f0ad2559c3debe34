"""Test helpers: AWQ and GPTQ checkpoints packed from the published layouts, in plain
PyTorch, independently of tokenmill.quant (which only unpacks them).

- AutoAWQ gemm: qweight int32 [in, out/8], word j of row i holds columns 8j + ORDER[k] in
  bits 4k.. with ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros int32 [groups, out/8] the same;
  scales float16 [groups, out]; w = (q - z) * s, group = i // group_size.
- GPTQ: qweight int32 [in * bits/32, out], word r of column o holds input rows
  r * 32/bits + k in bits k*bits..; qzeros int32 [groups, out * bits/32] packs consecutive
  columns the same way; scales float16 [groups, out]; g_idx int32 [in];
  w = s[g_idx[i]] * (q - z[g_idx[i]]). checkpoint_format "gptq" (v1) stores the packed zero
  words minus 0x11111111 (GPTQModel's v2 -> v1 conversion; a borrow where z = 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words % 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints 0..15 -> int32 [rows, cols / 8] in AutoAWQ's column order."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for k in range(8):
        words |= values[:, [8 * j + AWQ_ORDER[k] for j in range(cols // 8)]].to(torch.int64) << (4 * k)
    return _to_int32(words)


def gptq_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[in, out] codes -> int32 [in * bits / 32, out]: consecutive input rows per word."""
    per_word = 32 // bits
    words = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.int64)
    for k in range(per_word):
        words |= values[k::per_word].to(torch.int64) << (bits * k)
    return _to_int32(words)


def gptq_pack_cols(values: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """[groups, out] zero points -> int32 [groups, out * bits / 32]: consecutive columns per word."""
    per_word = 32 // bits
    words = torch.zeros(values.shape[0], values.shape[1] // per_word, dtype=torch.int64)
    for k in range(per_word):
        words |= values[:, k::per_word].to(torch.int64) << (bits * k)
    if v1:
        words -= sum(1 << (bits * k) for k in range(per_word))
    return _to_int32(words)


def quantize_reference(w: torch.Tensor, group: torch.Tensor, num_groups: int, bits: int, sym: bool):
    """Min/max round-to-nearest of w [out, in] per (row, group): (q [out, in], z [out, groups],
    s [out, groups] float16). sym: z = 2^(bits-1)."""
    out = w.shape[0]
    maxq = 2**bits - 1
    s = torch.empty(out, num_groups)
    z = torch.empty(out, num_groups)
    for g in range(num_groups):
        cols = w[:, group == g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            s[:, g] = torch.maximum(hi, -lo).clamp(min=1e-6) * 2 / maxq
            z[:, g] = (maxq + 1) // 2
        else:
            s[:, g] = (hi - lo).clamp(min=1e-6) / maxq
            z[:, g] = torch.round(-lo / s[:, g])
    s = s.half()
    q = torch.clamp(torch.round(w / s.float()[:, group]) + z[:, group], 0, maxq)
    return q.to(torch.int64), z.to(torch.int64), s


def reference_weight(q, z, s, group) -> torch.Tensor:
    """The plain dequantization: s[g] * (q - z[g]) in float32, [out, in]."""
    return s.float()[:, group] * (q - z[:, group]).float()


def write_quantized(float_dir: Path, dst: Path, method: str, group_size: int, *, sym: bool = False,
                    desc_act: bool = False, v1: bool = True, bits: int = 4, seed: int = 0) -> dict[str, tuple]:
    """Quantize every decoder projection of a float checkpoint into an AWQ ("awq") or GPTQ
    ("gptq") checkpoint at dst. Returns each projection's (q [out, in], z [out, groups],
    s [out, groups] float16, group [in]). AWQ with sym: zero_point false and no qzeros
    (codes centred on 8)."""
    shutil.copytree(float_dir, dst)
    tensors = load_file(str(float_dir / "model.safetensors"))
    out_tensors, reference = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for name, w in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
            out_tensors[name] = w
            continue
        w = w.float()
        cols = w.shape[1]
        num_groups = -(-cols // group_size)
        if desc_act:  # GPTQ act-order: groups follow a permutation of the input columns
            perm = torch.randperm(cols, generator=gen)
            group = torch.empty(cols, dtype=torch.int64)
            group[perm] = torch.arange(cols) // group_size
        else:
            group = torch.arange(cols) // group_size
        q, z, s = quantize_reference(w, group, num_groups, bits, sym)
        if not sym and method == "gptq":
            z[0, 0] = 0  # a zero point of 0: the v1 encoding borrows from the next field
        reference[name] = (q, z, s, group)
        if method == "awq":
            out_tensors[f"{module}.qweight"] = awq_pack(q.t())
            if not sym:
                out_tensors[f"{module}.qzeros"] = awq_pack(z.t())
            out_tensors[f"{module}.scales"] = s.t().contiguous()
        else:
            out_tensors[f"{module}.qweight"] = gptq_pack_rows(q.t(), bits)
            out_tensors[f"{module}.qzeros"] = gptq_pack_cols(z.t(), bits, v1)
            out_tensors[f"{module}.scales"] = s.t().contiguous()
            out_tensors[f"{module}.g_idx"] = group.to(torch.int32)
    save_file(out_tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": not sym, "version": "gemm"}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": desc_act, "sym": sym,
                                         "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (dst / "config.json").write_text(json.dumps(config))
    return reference
