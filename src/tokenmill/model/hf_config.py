"""A checkpoint's ModelConfig: Hugging Face `config.json` (or GGUF metadata, via
`load_model_config`), refusing what we cannot run."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.config import ModelConfig
from tokenmill.model.registry import SUPPORTED_ARCHITECTURES, get_arch_spec

_SUPPORTED_ROPE_TYPES = ("default", "llama3")


def _unsupported(path: Path, option: str, detail: str) -> ValueError:
    return ValueError(
        f"{path}: unsupported config option {option} ({detail}). tokenmill supports "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} with full attention and rope_scaling "
        f"types {', '.join(_SUPPORTED_ROPE_TYPES)}."
    )


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` of a checkpoint directory.

    Raises:
        FileNotFoundError: no config.json in `model_dir`.
        ValueError: the file is not valid JSON, misses a required field, or asks for an
            architecture or option tokenmill does not support (the message names it).
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a checkpoint directory needs config.json.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None

    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"{path}: expected exactly one entry in 'architectures', got {archs}.")
    arch = archs[0]
    try:
        spec = get_arch_spec(arch)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

    def req(key: str):
        if key not in cfg:
            raise ValueError(f"{path}: missing required field {key!r} for {arch}.")
        return cfg[key]

    hidden = req("hidden_size")
    num_heads = req("num_attention_heads")
    num_layers = req("num_hidden_layers")
    max_pos = cfg.get("max_position_embeddings", 2048)

    # Sliding-window attention changes the math; refuse it unless the window covers
    # every position the model can see (then it is full attention).
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window is not None and window < max_pos:
        raise _unsupported(path, f"sliding_window={window}", "sliding-window attention")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _unsupported(path, "layer_types", f"non-full attention layers {set(layer_types)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(path, f"hidden_act={act!r}", "only silu (SwiGLU) is implemented")

    rope_scaling = cfg.get("rope_scaling") or None
    rope_theta = cfg.get("rope_theta")
    # transformers 5 writes rope settings under "rope_parameters".
    rope_params = cfg.get("rope_parameters")
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise _unsupported(path, f"rope_scaling type {rope_type!r}", "rope scaling")
        if rope_type == "default":
            rope_scaling = None

    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        architecture=arch,
        vocab_size=req("vocab_size"),
        hidden_size=hidden,
        intermediate_size=req("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        max_position_embeddings=max_pos,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=spec.qkv_bias or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=spec.qk_norm,
        rope_scaling=rope_scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load_model_config(model: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint: a Hugging Face directory (config.json) or a GGUF file.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file or its options are not supported (the message names them).
    """
    from tokenmill.model.gguf import is_gguf_file
    from tokenmill.model.gguf.config import model_config_from_gguf
    from tokenmill.model.gguf.reader import GGUFFile

    path = Path(model)
    if is_gguf_file(path):
        return model_config_from_gguf(GGUFFile(path))
    if path.suffix.lower() == ".gguf" and not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file not found.")
    if path.is_file():
        raise ValueError(f"{path}: not a GGUF file; a model is a Hugging Face checkpoint directory or a .gguf file.")
    return load_hf_config(path)
