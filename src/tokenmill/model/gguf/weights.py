"""GGUF tensors -> Hugging Face parameter names and layout: float32 tensors, or matrices
kept in their stored format for the CPU kernels.

Two conventions of llama.cpp's converter are undone here:
- names: `blk.{i}.attn_q.weight` is `model.layers.{i}.self_attn.q_proj.weight`, etc.;
- rotary layout: for the `llama` architecture the converter reorders the rows of q and k
  within each head so that llama.cpp can rotate adjacent pairs (x0, x1), (x2, x3), ...;
  Hugging Face (and tokenmill) rotate the two halves (x_i, x_{i + D/2}). `unpermute_rotary`
  puts the rows back. Qwen2/Qwen3 files are written in the halves layout and kept as is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.gguf.dequant import dequantize
from tokenmill.model.gguf.quant_types import F32
from tokenmill.model.gguf.reader import GGUFFile
from tokenmill.model.stored_weight import StoredWeight

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Consumed by the config (Llama 3 rope scaling factors), not a parameter.
_CONFIG_ONLY = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it has no place in our models."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m is None or m.group(2) not in _PER_LAYER:
        return None
    return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, rows (0, D/2, 1, D/2 + 1, ...) -> (0, 1, ..., D - 1).

    w: [num_heads * head_dim, ...] (a weight or a bias).
    """
    head_dim = w.shape[0] // num_heads
    # [H, D/2, 2, ...] -> [H, 2, D/2, ...]: pair members go back to the two halves.
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(
    f: GGUFFile, cfg: ModelConfig, keep_stored: bool = False
) -> Iterator[tuple[str, torch.Tensor | StoredWeight]]:
    """Yield (Hugging Face name, tensor) for every parameter tensor of the file.

    Every tensor's name and type are checked before any is dequantized, so a bad file fails
    at once. Tensors are float32; with `keep_stored`, matrices stored quantized or in 16
    bits stay in their format as memory-mapped `StoredWeight`s (the CPU kernels read them).

    Raises:
        ValueError: a tensor of an unsupported type or with no place in the model (the
            message names the tensor).
    """
    from tokenmill.model.gguf.quant_types import QUANT_TYPES

    names = {}
    for name, info in f.tensors.items():
        if info.ggml_type not in QUANT_TYPES:
            raise ValueError(
                f"{f.path}: tensor {name!r} has type {info.type_name}, which tokenmill cannot load; "
                f"supported: {', '.join(t.name for t in QUANT_TYPES.values())}."
            )
        if name in _CONFIG_ONLY:
            continue
        target = hf_name(name)
        if target is None:
            raise ValueError(f"{f.path}: tensor {name!r} has no place in a {cfg.architecture} model.")
        names[name] = target
    permuted = cfg.architecture == "LlamaForCausalLM"
    for name, target in names.items():
        info = f.tensors[name]
        # F32 matrices stay float (oneDNN multiplies them best); the kernels read rows of
        # whole 32-value blocks only.
        if keep_stored and len(info.shape) == 2 and info.ggml_type != F32 and info.shape[1] % 32 == 0:
            w = StoredWeight(info.ggml_type, torch.from_numpy(f.raw_blocks(name)), info.shape[1])
        else:
            w = dequantize(f.raw_blocks(name), info.ggml_type, info.shape)
        if permuted and ".self_attn.q_proj." in target:
            w = _permute_rows(w, cfg.num_heads)
        elif permuted and ".self_attn.k_proj." in target:
            w = _permute_rows(w, cfg.num_kv_heads)
        yield target, w


def _permute_rows(w: torch.Tensor | StoredWeight, num_heads: int) -> torch.Tensor | StoredWeight:
    if isinstance(w, StoredWeight):  # rows are whole blocks: the same row order applies
        return dataclasses.replace(w, blocks=unpermute_rotary(w.blocks, num_heads))
    return unpermute_rotary(w, num_heads)
