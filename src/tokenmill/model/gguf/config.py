"""GGUF metadata -> ModelConfig, refusing what tokenmill cannot run (the message names the
file and the metadata key or tensor)."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.gguf.dequant import dequantize
from tokenmill.model.gguf.reader import GGUFFile
from tokenmill.model.gguf.vocab import end_of_generation_ids
from tokenmill.model.layers.rotary import _llama3_inv_freq
from tokenmill.model.registry import get_arch_spec

# GGUF architecture -> tokenmill (Hugging Face) architecture.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Keys whose presence means a model shape we do not implement, with why.
_REFUSED_KEYS = {
    "expert_count": "mixture-of-experts layers",
    "attention.q_lora_rank": "multi-head latent attention",
    "attention.kv_lora_rank": "multi-head latent attention",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "attention.clamp_kqv": "clamped q/k/v",
    "attention.max_alibi_bias": "ALiBi positions",
    "rope.scaling.attn_factor": "rope attention scaling",
}


class _Meta:
    """`{arch}.*` metadata lookups whose errors name the file and the key."""

    def __init__(self, f: GGUFFile, arch: str) -> None:
        self.f, self.arch = f, arch

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def get(self, name: str, default: Any = None) -> Any:
        return self.f.get(self.key(name), default)

    def required(self, name: str) -> Any:
        if self.key(name) not in self.f.metadata:
            raise ValueError(f"{self.f.path}: missing required metadata key {self.key(name)!r}.")
        return self.f.metadata[self.key(name)]

    def refuse(self, name: str, detail: str) -> ValueError:
        return ValueError(
            f"{self.f.path}: unsupported metadata {self.key(name)}={self.get(name)!r} ({detail}); "
            "tokenmill runs llama, qwen2 and qwen3 models with full causal attention."
        )

    def integer(self, name: str, default: int | None = None) -> int:
        value = self.get(name, default) if default is not None else self.required(name)
        if isinstance(value, list):
            # Per-layer values (e.g. a different head count per layer).
            raise self.refuse(name, "a different value per layer")
        return int(value)


def _llama3_scaling(f: GGUFFile, meta: _Meta, head_dim: int, theta: float) -> dict | None:
    """Llama 3.1+ files store their rope scaling as per-frequency factors in `rope_freqs.weight`.
    Recover the `rope_scaling` dict that produces exactly those factors, or refuse."""
    if "rope_freqs.weight" not in f.tensors:
        return None
    info = f.tensors["rope_freqs.weight"]
    factors = dequantize(f.raw_blocks(info.name), info.ggml_type, info.shape).double()
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if factors.shape != inv_freq.shape:
        raise ValueError(
            f"{f.path}: tensor 'rope_freqs.weight' has shape {list(factors.shape)}, expected [{head_dim // 2}]."
        )
    if torch.all(factors == 1.0):
        return None
    original = meta.get("rope.scaling.original_context_length", 8192)
    candidate = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original),
    }
    implied = inv_freq / _llama3_inv_freq(inv_freq, candidate)
    if not torch.allclose(implied, factors, rtol=1e-4, atol=0):
        raise ValueError(
            f"{f.path}: tensor 'rope_freqs.weight' holds per-frequency rope factors that are not "
            "Llama 3's scaling (low_freq_factor 1, high_freq_factor 4); tokenmill cannot run them."
        )
    return candidate


def model_config_from_gguf(f: GGUFFile) -> ModelConfig:
    """Read the model shape from a GGUF file's metadata.

    Raises:
        ValueError: an unsupported architecture or option (the message names the key).
    """
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{f.path}: unsupported metadata general.architecture={arch!r}; tokenmill runs GGUF "
            f"architectures {', '.join(GGUF_ARCHITECTURES)}."
        )
    hf_arch = GGUF_ARCHITECTURES[arch]
    spec = get_arch_spec(hf_arch)
    meta = _Meta(f, arch)
    for name, detail in _REFUSED_KEYS.items():
        value = meta.get(name)
        if value not in (None, 0, 0.0, False):
            raise meta.refuse(name, detail)

    hidden = meta.integer("embedding_length")
    num_heads = meta.integer("attention.head_count")
    num_kv_heads = meta.integer("attention.head_count_kv", num_heads)
    head_dim = meta.integer("attention.key_length", hidden // num_heads)
    if meta.integer("attention.value_length", head_dim) != head_dim:
        raise meta.refuse("attention.value_length", f"value heads wider or narrower than key heads ({head_dim})")
    if meta.integer("rope.dimension_count", head_dim) != head_dim:
        raise meta.refuse("rope.dimension_count", f"rotary on part of each head (head_dim {head_dim})")
    context = meta.integer("context_length")
    window = meta.get("attention.sliding_window")
    if window and window < context:
        raise meta.refuse("attention.sliding_window", "sliding-window attention")
    if meta.get("attention.causal", True) is not True:
        raise meta.refuse("attention.causal", "non-causal attention")
    scaling_type = meta.get("rope.scaling.type", "none")
    if scaling_type not in ("none", "llama3"):
        raise meta.refuse("rope.scaling.type", "rope scaling other than Llama 3's")
    theta = float(meta.get("rope.freq_base", 10000.0))
    rope_scaling = _llama3_scaling(f, meta, head_dim, theta)
    eps = meta.get("attention.layer_norm_rms_epsilon")
    if eps is None:
        raise ValueError(f"{f.path}: missing required metadata key {meta.key('attention.layer_norm_rms_epsilon')!r}.")

    embed = f.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{f.path}: missing tensor 'token_embd.weight'.")
    vocab_size = meta.integer("vocab_size", embed.shape[0])
    layer0 = "blk.0."
    bos = f.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=meta.integer("feed_forward_length"),
        num_layers=meta.integer("block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=theta,
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in f.tensors,
        qkv_bias=spec.qkv_bias or f"{layer0}attn_q.bias" in f.tensors,
        o_bias=f"{layer0}attn_output.bias" in f.tensors,
        mlp_bias=f"{layer0}ffn_up.bias" in f.tensors,
        qk_norm=spec.qk_norm,
        rope_scaling=rope_scaling,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(sorted(end_of_generation_ids(f.metadata))),
    )

