"""A decode step's decoder layers in one kernel call, for models on stored weights.

At one token per request a layer of a quantized SmolLM2-135M multiplies in ~0.1 ms, and
the ~30 torch operators its Python modules dispatch cost about as much again: a one-stream
decode step spent ~5 of its ~13 ms between kernels. `decode_layers` (kernels/csrc/
decode_layers.cpp) calls the same kernels in the same order from C++, so its hidden
states are bit-identical to the modules' (tests/model/test_decode_layers.py). The modules
in llama.py stay the definition of the model and run everything this path does not:
prefill and mixed steps, 16-bit activations, biases, q/k norms, float weights, GPTQ
act-order, and machines without the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model import kernels
from tokenmill.model.layers.attention import AttentionMetadata
from tokenmill.model.layers.linear import Linear
from tokenmill.model.stored_weight import StoredWeight


@dataclass(frozen=True)
class DecodeLayers:
    """What decode_layers needs of a model, gathered once after loading."""

    weights: list[torch.Tensor]  # per layer: qkv, o, gate_up, down blocks; post-attention norm; the next norm
    formats: list[int]  # per layer: (ggml type, rows8) of each projection
    num_heads: int
    eps: float
    scale: float

    @staticmethod
    def build(model: torch.nn.Module) -> DecodeLayers | None:
        """None unless every layer fits: CPU kernels, float32 norms, no biases or q/k norms,
        each projection one stored part in the natural column order."""
        cfg = model.config
        if kernels.cpu_kernels() is None or cfg.qk_norm:
            return None
        layers = model.model.layers
        weights: list[torch.Tensor] = []
        formats: list[int] = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                part = _single_part(linear)
                if part is None:
                    return None
                weights.append(part.blocks)
                formats += [part.ggml_type, int(part.rows8)]
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else model.model.norm
            weights += [layer.post_attention_layernorm.weight, following.weight]
        if any(w.dtype != torch.float32 for w in weights[4::6] + weights[5::6]):
            return None
        return DecodeLayers(weights, formats, cfg.num_heads, cfg.rms_norm_eps, cfg.head_dim**-0.5)

    @staticmethod
    def applies(x: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> bool:
        """Whether this step can take the path: decodes only, float32 activations and cache,
        decode attention by the kernel (no mask)."""
        return (
            meta.num_decodes == x.shape[0]
            and not meta.prefills
            and meta.decode_mask is None
            and x.dtype == torch.float32
            and kv_caches[0].dtype == torch.float32
        )

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x [T, hidden]: the first layer's normed input, residual its stream (updated in
        place). Returns the final norm's output [T, hidden]."""
        return kernels.cpu_kernels().decode_layers(
            x, residual, kv_caches, self.weights, self.formats, *cos_sin, meta.slot_mapping,
            meta.decode_block_tables, meta.decode_seq_lens, self.num_heads, self.eps, self.scale,
        )


def _single_part(linear: Linear) -> StoredWeight | None:
    """The layer's one stored part when it has exactly one in natural column order, else None."""
    if len(linear.stored) != 1 or linear.bias is not None:
        return None
    (_, part), = linear.stored
    return part if part.input_perm is None else None
