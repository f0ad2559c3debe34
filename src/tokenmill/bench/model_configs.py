"""Random-weight checkpoints built from real models' published architecture configs.

Speed does not depend on weight values when generation length is fixed (ignore_eos), so a
benchmark needs the architecture, not the download. `build_checkpoint` writes an HF-layout
folder (config.json, model.safetensors under HF tensor names, tokenizer files) with torch +
safetensors only. Weights are N(0, 0.02) in bf16, norm weights are ones. The tokenizer is the
bundled demo model's when it covers the model's vocabulary, else a word-level placeholder
that does (see sync_tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.tokenizer import DEMO_MODEL_DIR

# Bump when the weight or config files written change, so stale cached checkpoints are
# rebuilt. Tokenizer files need no bump: sync_tokenizer refreshes them on every cache hit.
BUILD_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ArchConfig:
    """The architecture fields of a published config.json (HF names in hf_config)."""

    name: str  # our key, e.g. "smollm2-135m"
    source: str  # the real model it copies
    architecture: str  # LlamaForCausalLM | Qwen2ForCausalLM
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0
    rope_scaling: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # model-type specific keys

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.architecture == "Qwen2ForCausalLM"

    def hf_config(self) -> dict[str, Any]:
        """config.json contents."""
        model_type = "qwen2" if self.architecture == "Qwen2ForCausalLM" else "llama"
        cfg: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": model_type,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "initializer_range": 0.02, "torch_dtype": "bfloat16",
            "use_cache": True, "attention_dropout": 0.0,
            "tokenmill_random_weights": f"random N(0, 0.02) weights with the architecture of {self.source}",
        }
        if model_type == "llama":
            cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        cfg.update(self.extra)
        return cfg

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape, in file order."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}"
            shapes[f"{p}.input_layernorm.weight"] = (h,)
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[f"{p}.self_attn.{proj}.weight"] = (rows, h)
                if self.has_qkv_bias:
                    shapes[f"{p}.self_attn.{proj}.bias"] = (rows,)
            shapes[f"{p}.self_attn.o_proj.weight"] = (h, q)
            shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
            shapes[f"{p}.mlp.gate_proj.weight"] = (self.intermediate_size, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (self.intermediate_size, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, self.intermediate_size)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


MODEL_CONFIGS: dict[str, ArchConfig] = {
    c.name: c
    for c in (
        ArchConfig("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "LlamaForCausalLM", hidden_size=576,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=8192, bos_token_id=0, eos_token_id=0),
        ArchConfig("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2ForCausalLM", hidden_size=896,
                   num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                   intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643,
                   extra={"use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24}),
        ArchConfig("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "LlamaForCausalLM", hidden_size=2048,
                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    )
}


def build_checkpoint(cfg: ArchConfig, out_dir: str | Path, seed: int = 0,
                     tokenizer_dir: str | Path | None = DEMO_MODEL_DIR) -> Path:
    """Write a random-weight HF checkpoint.

    Args:
        cfg: the architecture.
        out_dir: created if missing; existing files are overwritten.
        seed: weights are a function of the seed and tensor order only.
        tokenizer_dir: tokenizer files to copy; without a tokenizer.json there, or with one
            smaller than cfg.vocab_size, a placeholder vocabulary is written (see tokenizer_files).

    Returns:
        out_dir as a Path.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in cfg.tensor_shapes().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:  # sampled in fp32 (bf16 normal_ is not implemented everywhere), stored as bf16
            tensors[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(
                torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.hf_config(), indent=2) + "\n")
    gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    sync_tokenizer(out, cfg, tokenizer_dir)
    return out


def tokenizer_files(cfg: ArchConfig, tokenizer_dir: str | Path | None) -> dict[str, bytes]:
    """The tokenizer files (name -> contents) a checkpoint of cfg should carry.

    The files of tokenizer_dir when its tokenizer.json covers cfg.vocab_size; otherwise a
    placeholder. A smaller tokenizer (the demo model's 4,096 tokens against 49k-152k) would
    decode most generated ids to nothing, so a server would stream empty chunks that no
    client can time.
    """
    src_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if src_dir is not None and (src_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        src_tokenizer = Tokenizer.from_file(str(src_dir / "tokenizer.json"))
        if src_tokenizer.get_vocab_size(with_added_tokens=True) >= cfg.vocab_size:
            return {f: (src_dir / f).read_bytes() for f in _TOKENIZER_FILES if (src_dir / f).is_file()}
    return _placeholder_tokenizer_files(cfg)


def _placeholder_tokenizer_files(cfg: ArchConfig) -> dict[str, bytes]:
    """A word-level vocabulary "<0>" .. "<vocab_size-1>": every id decodes to text.

    Engines need a tokenizer.json to load, and benchmarks feed token ids; deterministic, so
    a checkpoint that already has it is left untouched.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(cfg.vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A bare template (message contents joined) so the chat endpoint can be benchmarked too.
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
              "eos_token": f"<{cfg.eos_token_id}>", "bos_token": f"<{cfg.bos_token_id}>"}
    return {"tokenizer.json": tok.to_str(pretty=True).encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def sync_tokenizer(out_dir: Path, cfg: ArchConfig, tokenizer_dir: str | Path | None) -> None:
    """Make a checkpoint's tokenizer files those of tokenizer_files(cfg, tokenizer_dir).

    Only changed files are written (each atomically: a server may be reading them) and
    tokenizer files of another tokenizer are removed, so a cached checkpoint follows the
    demo model's tokenizer, or moves to the placeholder when that tokenizer is too small.
    """
    wanted = tokenizer_files(cfg, tokenizer_dir)
    for fname in _TOKENIZER_FILES:
        dst = out_dir / fname
        if fname not in wanted:
            dst.unlink(missing_ok=True)
        elif not dst.is_file() or dst.read_bytes() != wanted[fname]:
            tmp = dst.with_name(f"{fname}.tmp-{os.getpid()}")
            tmp.write_bytes(wanted[fname])
            os.replace(tmp, dst)


def default_cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "tokenmill" / "checkpoints"


def cached_checkpoint(name: str, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint folder for a model-config name, built on first use.

    Args:
        name: a key of MODEL_CONFIGS.
        cache_dir: default $XDG_CACHE_HOME/tokenmill/checkpoints.

    Returns:
        The folder (complete: built into a temp folder, then renamed).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    cfg = MODEL_CONFIGS[name]
    final = Path(cache_dir or default_cache_dir()) / name
    stamp = {"build_version": BUILD_VERSION, "config": cfg.hf_config()}
    marker = final / "tokenmill_build.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        sync_tokenizer(final, cfg, DEMO_MODEL_DIR)
        return final
    tmp = final.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_checkpoint(cfg, tmp, tokenizer_dir=DEMO_MODEL_DIR)
    (tmp / "tokenmill_build.json").write_text(json.dumps(stamp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
