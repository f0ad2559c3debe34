"""Test helpers: write GGUF files the way llama.cpp's converter does, with the `gguf`
package's writer (the reference implementation of the format).

`hf_to_gguf` turns a tiny Hugging Face checkpoint (tests/conftest.py) into a GGUF: llama.cpp
tensor names, q/k rows permuted for the llama architecture, tokenizer metadata from
tokenizer.json, any weight quantized to a chosen type.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: within each head, interleave the two rotary halves' rows."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in _TOP_NAMES:
        return _TOP_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)  # model.layers.{i}.<module>.<weight|bias>
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"


def random_blocks(qtype: QT, num_rows: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Random stored blocks whose float16 scales are finite (so every value is a number)."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(num_rows * row_len // block_size, block_bytes), dtype=np.uint8)
    # Every float16 field of these layouts: overwrite it with a small finite value.
    half_offsets = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
                    QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}.get(qtype, [])
    for off in half_offsets:
        scales = rng.uniform(-0.05, 0.05, size=raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(num_rows, -1)


def _add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    types = [gguf.TokenType.NORMAL] * vocab_size
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):  # ids the trainer did not fill: unused placeholders
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[cfg["bos_token"]] if cfg["bos_token"] in vocab else tokens.index(cfg["bos_token"]))
    w.add_eos_token_id(tokens.index(cfg["eos_token"]))
    w.add_add_bos_token(True)  # the checkpoint's post-processor prepends <s>
    w.add_chat_template(cfg["chat_template"])


def hf_to_gguf(model_dir: Path, out: Path, quant: dict[str, QT] | None = None,
               extra_metadata: dict | None = None, rope_freqs: np.ndarray | None = None) -> Path:
    """Convert a tiny HF checkpoint to GGUF.

    Args:
        quant: GGUF tensor name suffix (e.g. "attn_q.weight") -> type to store it in
            (quantized with gguf.quants.quantize); the rest stays F32.
        extra_metadata: more `{arch}.*` keys (without the prefix) -> value.
        rope_freqs: a rope_freqs.weight tensor to add (Llama 3 rope scaling factors).
    """
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    hf_arch = config["architectures"][0]
    arch = GGUF_ARCH[hf_arch]
    num_heads = config["num_attention_heads"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads

    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(num_heads)
    w.add_head_count_kv(num_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    w.add_vocab_size(config["vocab_size"])
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        elif isinstance(value, bool):
            w.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    _add_tokenizer(w, model_dir, config["vocab_size"])

    tensors = load_file(str(model_dir / "model.safetensors"))
    for hf, value in tensors.items():
        if hf == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        name = gguf_name(hf)
        value = value.astype(np.float32)
        if arch == "llama" and ".attn_q." in name:
            value = llama_cpp_permute(value, num_heads)
        elif arch == "llama" and ".attn_k." in name:
            value = llama_cpp_permute(value, num_kv_heads)
        qtype = next((t for suffix, t in (quant or {}).items() if name.endswith(suffix)), None)
        if qtype is None or value.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(value))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(value), qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_reference_weights(gguf_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the `gguf` package's own reader and
    reference dequantization (independent of tokenmill), by GGUF name, torch shape."""
    reader = gguf.GGUFReader(str(gguf_path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))
    return out


def real_model_path() -> str:
    """The real SmolLM2-135M-Instruct GGUF; fails the test (never skips) when it is missing."""
    import pytest

    from tokenmill.model.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.fail(f"this test needs the real model file. {e}", pytrace=False)


def quantize_blocks(w: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [rows, cols] -> stored blocks uint8 [rows, row_bytes] approximating w. The
    `gguf` package quantizes the 32-value formats; it has no K-quant quantizer, so Q4_K and
    Q6_K are encoded here (simple per-sub-block min/max scales, not llama.cpp's search),
    checked against the package's own dequantization."""
    if qtype not in (QT.Q4_K, QT.Q6_K):
        return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype).view(np.uint8)
    rows, cols = w.shape
    blocks = (_q4_k_blocks if qtype == QT.Q4_K else _q6_k_blocks)(w.reshape(-1, 256).astype(np.float32))
    out = blocks.reshape(rows, -1)
    back = gguf.quants.dequantize(out, qtype).reshape(rows, cols)
    assert np.abs(back - w).mean() < 0.2 * np.abs(w).mean(), "K-quant encoder and reference disagree"
    return out


def _q4_k_blocks(w: np.ndarray) -> np.ndarray:
    """[n, 256] -> [n, 144]: d, dmin (float16), 6-bit scales and mins of 8 sub-blocks of 32,
    then 4-bit codes; value = d * sc * q - dmin * m."""
    n = w.shape[0]
    sub = w.reshape(n, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)
    scale, mins = (hi - lo) / 15, -lo  # [n, 8]
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.clip(np.round(np.divide(sub + (dminf * m)[..., None], step, out=np.zeros_like(sub), where=step > 0)), 0, 15)
    q = q.astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # sub-blocks 2i (low) and 2i+1 (high)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed, qs], axis=1)


def _q6_k_blocks(w: np.ndarray) -> np.ndarray:
    """[n, 256] -> [n, 210]: 4 low bits (ql), 2 high bits (qh), int8 scales per 16 values,
    d (float16); value = d * sc * (q - 32)."""
    n = w.shape[0]
    sub = w.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # [n, 16]
    d = (scale.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -128, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.clip(np.round(np.divide(sub, step, out=np.zeros_like(sub), where=step != 0)) + 32, 0, 63)
    q = q.astype(np.uint8).reshape(n, 2, 4, 32)  # [half, quarter, l]
    ql = np.zeros((n, 2, 64), np.uint8)
    ql[:, :, :32] = (q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4)
    ql[:, :, 32:] = (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d[:, None].view(np.uint8)], axis=1)
