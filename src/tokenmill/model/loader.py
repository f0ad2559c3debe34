"""Checkpoint directory -> ready-to-run model on the chosen device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.weights import iter_weights

# Tensors some checkpoints carry that we recompute instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def load_model(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaForCausalLM:
    """Build the model and fill it from the checkpoint's safetensors.

    Weights already in `dtype` on CPU stay memory-mapped (no copy). Raises ValueError
    naming the tensor when a tensor is missing, unexpected or of the wrong shape.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    expected = {n: p.shape for n, p in model.named_parameters()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor in iter_weights(model_dir):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store it anyway; the embedding is the truth
        if name not in expected:
            raise ValueError(
                f"{model_dir}: unexpected tensor {name!r} for {cfg.architecture} "
                "(does config.json match the weights?)."
            )
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(
                f"{model_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name])}."
            )
        _set_param(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{model_dir}: checkpoint is missing tensors: {shown}.")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers (rotary cos/sin) were created on meta; rebuild them for real on the device.
    model.model.rotary.materialize(device)
    model.eval()
    return model
