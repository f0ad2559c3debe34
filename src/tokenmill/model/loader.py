"""Checkpoint (Hugging Face directory or GGUF file) -> ready-to-run model on the chosen
device and dtype."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model import kernels
from tokenmill.model.decode_layers import DecodeLayers
from tokenmill.model.layers.embedding import Embedding
from tokenmill.model.layers.linear import Linear
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.stored_weight import StoredWeight
from tokenmill.model.weights import iter_weights


def checkpoint_tensors(
    model_path: str | Path, cfg: ModelConfig, keep_stored: bool, opened: list | None = None
) -> Iterator[tuple[str, torch.Tensor | StoredWeight]]:
    """(Hugging Face name, tensor) for every tensor of a safetensors directory or GGUF file;
    with keep_stored, a GGUF file's quantized and 16-bit matrices, and the integer weights
    of an AWQ / GPTQ / tokenmill int8 checkpoint, stay as stored (kernel block formats).
    A GGUF file opened here is appended to `opened` (for release_resident_pages)."""
    from tokenmill.model.gguf import is_gguf_file

    if is_gguf_file(model_path):
        from tokenmill.model.gguf.reader import GGUFFile
        from tokenmill.model.gguf.weights import iter_gguf_weights

        gguf_file = GGUFFile(model_path)
        if opened is not None:
            opened.append(gguf_file)
        return iter_gguf_weights(gguf_file, cfg, keep_stored)
    from tokenmill.quant.config import read_quant_config

    quant = read_quant_config(model_path)
    if quant is not None:
        from tokenmill.quant.checkpoint import iter_quantized_weights

        return iter_quantized_weights(model_path, quant, keep_stored)
    return iter_weights(model_path)


def _set_stored(model: nn.Module, target: str, rows: slice | None, weight: StoredWeight, dtype: torch.dtype) -> None:
    module = model.get_submodule(target.rpartition(".")[0])
    if isinstance(module, Linear):
        module.set_stored(rows.start if rows is not None else 0, weight)
    elif isinstance(module, Embedding):
        module.set_stored(weight, dtype)
    else:  # no kernel path for this parameter: it never happens for the models we build
        raise TypeError(f"{target}: a stored weight for a {type(module).__name__}")


# Tensors some checkpoints carry that we recompute instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Checkpoint projections that we store stacked in one fused parameter, in stack order:
# HF module name -> our module name.
_STACKED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _shard_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "qkv_proj":
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _checkpoint_layout(model: nn.Module, cfg: ModelConfig) -> dict[str, tuple[str, slice | None, tuple[int, ...]]]:
    """Every checkpoint tensor we expect, by HF name: (our parameter, its rows or None for
    the whole of it, the shape the checkpoint tensor must have)."""
    layout = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module_path, _, attr = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        shards = [hf_leaf for hf_leaf, fused in _STACKED.items() if fused == leaf]
        if not shards:
            layout[name] = (name, None, tuple(p.shape))
            continue
        start = 0
        for hf_leaf, rows in zip(shards, _shard_sizes(cfg, leaf)):
            layout[f"{parent}.{hf_leaf}.{attr}"] = (name, slice(start, start + rows), (rows, *p.shape[1:]))
            start += rows
    return layout


def _materialize(model: nn.Module, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters[attr]
    if param.device.type == "meta":
        param = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
        module._parameters[attr] = param
    return param.data


def load_model(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
    keep_stored: bool = True,
) -> LlamaForCausalLM:
    """Build the model and fill it from the checkpoint's safetensors or GGUF tensors.

    With keep_stored, a GGUF file's quantized and 16-bit matrices, and a quantized
    safetensors checkpoint's integer weights, stay as stored where the CPU kernels can
    multiply them; otherwise they are dequantized to `dtype`.

    Raises ValueError naming the tensor when a tensor is missing, unexpected or of the
    wrong shape.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    expected = _checkpoint_layout(model, cfg)
    loaded: set[str] = set()
    keep_stored = keep_stored and device.type == "cpu" and kernels.cpu_kernels() is not None
    opened: list = []
    for name, tensor in checkpoint_tensors(model_dir, cfg, keep_stored, opened):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store it anyway; the embedding is the truth
        if name not in expected:
            raise ValueError(
                f"{model_dir}: unexpected tensor {name!r} for {cfg.architecture} "
                "(does the config match the weights?)."
            )
        target, rows, shape = expected[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{model_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {shape}."
            )
        if isinstance(tensor, StoredWeight):
            _set_stored(model, target, rows, tensor, dtype)
        elif rows is None and tensor.dtype == dtype and device.type == "cpu":
            # Keep it memory-mapped: no copy at load.
            module_name, _, attr = target.rpartition(".")
            model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            dest = _materialize(model, target, dtype, device)
            (dest if rows is None else dest[rows]).copy_(tensor)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{model_dir}: checkpoint is missing tensors: {shown}.")
    if cfg.tie_word_embeddings:
        embed = model.model.embed_tokens
        if embed.stored is not None:
            model.lm_head.set_stored(0, embed.stored)
        else:
            model.lm_head.weight = embed.weight
    model.model.rotary.materialize(device)
    for module in model.modules():
        if isinstance(module, Linear):
            module.finalize_for_cpu()
    model.decode_layers = DecodeLayers.build(model)
    for gguf_file in opened:
        gguf_file.release_resident_pages()  # the copies are made; what is still read pages back in
    model.eval()
    return model
