"""The side files of a Hugging Face checkpoint directory: copied from a safetensors
source, or written from a GGUF file's metadata (config.json from its ModelConfig,
tokenizer.json / tokenizer_config.json / generation_config.json from its vocabulary), so
that a checkpoint made from a GGUF is complete for tokenmill and for transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenmill.config import ModelConfig
from tokenmill.model.registry import get_arch_spec

# Files a checkpoint directory may carry besides its weights and config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3"}


def config_json(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """config.json for `cfg` that tokenmill's and transformers' readers turn back into `cfg`.

    Raises:
        ValueError: biases config.json cannot express (Llama's attention_bias is all of q/k/v/o).
    """
    spec = get_arch_spec(cfg.architecture)
    if cfg.qkv_bias != (spec.qkv_bias or cfg.o_bias):
        raise ValueError(f"q/k/v bias {cfg.qkv_bias} with o bias {cfg.o_bias}: config.json's attention_bias "
                         f"cannot express this for {cfg.architecture}.")
    out: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": _MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.o_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "torch_dtype": torch_dtype,
    }
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)


def write_gguf_tokenizer(gguf_path: Path, dst_dir: Path, cfg: ModelConfig) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and
    generation_config.json rebuilt from the GGUF's tokenizer metadata."""
    from tokenmill.model.gguf.reader import GGUFFile
    from tokenmill.model.gguf.vocab import vocab_from_gguf

    vocab = vocab_from_gguf(str(gguf_path), GGUFFile(gguf_path).metadata)
    vocab.tokenizer.save(str(dst_dir / "tokenizer.json"))
    config = {k: v for k, v in vocab.config.items() if v is not None}
    write_json(dst_dir / "tokenizer_config.json", {**config, "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(dst_dir / "generation_config.json", {"bos_token_id": cfg.bos_token_id, **vocab.generation_config})
