"""Architecture name -> how to build it. Llama, Mistral, Qwen2 and Qwen3 share one model
class and differ only by flags (q/k/v bias, q/k norm)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    qkv_bias: bool = False
    qk_norm: bool = False


SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
}


def get_arch_spec(architecture: str) -> ArchSpec:
    """Look up an architecture, or raise ValueError listing what is supported."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
        )
    return SUPPORTED_ARCHITECTURES[architecture]
