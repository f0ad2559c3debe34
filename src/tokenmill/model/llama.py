"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a flat token batch.

Module and parameter names equal the Hugging Face checkpoint names, so loading is a
direct name match. All activations are 2-D/3-D over the flat batch: there is no batch
dimension and no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model import kernels
from tokenmill.model.decode_layers import DecodeLayers
from tokenmill.model.layers.attention import AttentionMetadata, paged_attention, write_kv
from tokenmill.model.layers.embedding import Embedding
from tokenmill.model.layers.linear import Linear
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding, apply_rotary

CosSin = tuple[torch.Tensor, torch.Tensor]  # [T, 1, D] each

KVCache = torch.Tensor  # [2 (K, V), Hkv, num_blocks, block_size, D], one per layer


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one GEMM (loaded from the checkpoint's q_proj/k_proj/v_proj).
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 * Hkv) * D]
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            q.copy_(self.q_norm(q))  # back into qkv: the rotary below works on it in place
            k.copy_(self.k_norm(k))
        ops = kernels.for_tensor(qkv)
        if ops is not None:
            # Rotates q and k inside qkv and stores k, v in the cache, in one pass.
            ops.rotary_and_cache(qkv, *cos_sin, kv_cache, meta.slot_mapping, self.num_heads)
        else:
            qk = apply_rotary(qk, cos_sin)  # queries and keys rotate together: [T, Hq + Hkv, D]
            write_kv(kv_cache, qk[:, self.num_heads :], v, meta)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        # gate and up in one GEMM (loaded from gate_proj/up_proj).
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * I]
        ops = kernels.for_tensor(gate_up)
        if ops is not None:
            h = gate_up.new_empty(gate_up.shape[0], self.intermediate_size)
            ops.silu_and_mul(h, gate_up)  # one pass instead of split, silu and mul
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [T, I] each
            h = F.silu(gate) * up
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: CosSin, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's input before the residual add; residual: the stream so far
        (None at the first layer). Returns the same pair for the next layer: deferring
        each add into the next norm lets the CPU kernel do add + norm in one pass."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos_sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """The decoder stack; a container whose names match the checkpoint's `model.*`."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Decode steps in one kernel call where the loaded weights allow (decode_layers.py).
        self.decode_layers: DecodeLayers | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; logits are computed only where needed."""
        m = self.model
        x = m.embed_tokens(input_ids)  # [T, hidden]
        cos_sin = m.rotary.lookup(positions, x.dtype)  # once per step, shared by every layer
        if self.decode_layers is not None and self.decode_layers.applies(x, kv_caches, meta):
            residual, x = x, m.layers[0].input_layernorm(x)
            return self.decode_layers(x, residual, cos_sin, kv_caches, meta)
        residual = None
        for layer, kv_cache in zip(m.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta)
        x, _ = m.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
