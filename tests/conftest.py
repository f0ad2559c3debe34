"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers.

transformers is the reference implementation (a test-only dependency); the engine under
test never imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU to compile the Triton kernels for: every kernel this process defines runs in
    # Triton's interpreter on the CPU (read when a kernel is defined, so before any test
    # module imports one). Nothing else reads it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_CORPUS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
    "The quick brown fox jumps over the lazy dog. 0123456789",
] * 8

# Small enough to build in well under a second, big enough to exercise GQA and several blocks.
BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    # Larger than HF's 0.02 so logits are peaked: greedy parity then tests the math,
    # not the luck of near-ties between almost-uniform logits.
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope-tied": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama-mqa": ("LlamaConfig", {"num_key_value_heads": 1}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}


def write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}",
            }
        )
    )


def build_checkpoint(model_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random-weight float32 checkpoint + tokenizer to `model_dir`."""
    import transformers

    config_cls, arch_overrides = ARCHS[arch]
    cfg = getattr(transformers, config_cls)(**{**BASE, **arch_overrides, **overrides})
    torch.manual_seed(seed)
    model_cls = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))
    model = model_cls(cfg).float().eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir, BASE["vocab_size"])
    return model_dir


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build (and cache per session) a tiny checkpoint: factory(arch="llama", **overrides)."""
    cache: dict[str, Path] = {}

    def factory(arch: str = "llama", **overrides) -> Path:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in cache:
            cache[key] = build_checkpoint(tmp_path_factory.mktemp(arch), arch, **overrides)
        return cache[key]

    return factory


def _skip_without_cpu_kernels() -> None:
    from tokenmill.model import kernels

    # With TOKENMILL_CPU_KERNELS=require (CI) a failed build raises here instead.
    if kernels.cpu_kernels() is None:
        pytest.skip("needs the CPU kernels, which are off or could not be built here (see the log)")


@pytest.fixture
def requires_cpu_kernels() -> None:
    """For tests of what only the kernels run (weights kept as stored); without them the
    same checkpoints are dequantized at load, which other tests cover."""
    _skip_without_cpu_kernels()


@pytest.fixture(params=["cpu-kernels", "pytorch-fallback"])
def kernel_path(request, monkeypatch):
    """Run the test twice: with the compiled CPU kernels and with the PyTorch ops they
    replace (what runs without a compiler, and on GPU)."""
    from tokenmill.model import kernels

    if request.param == "cpu-kernels":
        _skip_without_cpu_kernels()
    else:
        monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
    return request.param


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the engine's GPU path on the CPU: every layer that has a Triton kernel calls it,
    in Triton's interpreter (TOKENMILL_GPU_KERNELS=interpret). Where a CUDA GPU is present
    the kernels are compiled for it instead and tests/model/test_cuda_gpu.py runs them."""
    import torch

    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the Triton kernels run compiled (test_cuda_gpu.py), not interpreted")
    from tokenmill.model import gpu_kernels

    monkeypatch.setenv(gpu_kernels.ENV_SWITCH, "interpret")
    gpu_kernels.mode.cache_clear()
    assert gpu_kernels.triton_ops() is not None
    yield
    gpu_kernels.mode.cache_clear()  # re-read once monkeypatch restores the environment


# ---- CPU kernel instruction-set paths ----------------------------------------------------------

ALL_ISAS = ("generic", "avx2", "avx512")
_ISAS_RUN: set[str] = set()
_ISAS_ASKED: set[str] = set()


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Run a kernel test on each instruction-set path of the CPU kernels that this CPU can
    execute; the others are reported as skipped, and the run's summary lists both."""
    from tokenmill.model import kernels

    runnable = kernels.available_isas()
    _ISAS_ASKED.add(request.param)
    if request.param not in runnable:
        pytest.skip(f"this CPU cannot run the {request.param} kernel path (it runs: {', '.join(runnable)})")
    _ISAS_RUN.add(request.param)
    with kernels.use_isa(request.param):
        yield request.param


def pytest_terminal_summary(terminalreporter):
    if not _ISAS_ASKED:
        return  # no kernel test ran
    from tokenmill.model import kernels

    ran = [name for name in ALL_ISAS if name in _ISAS_RUN]
    missing = [name for name in ALL_ISAS if name not in ran]
    line = f"CPU kernel paths tested: {', '.join(ran) or 'none'}"
    if missing:
        line += f"; not run here: {', '.join(missing)} (this CPU runs {', '.join(kernels.available_isas()) or 'none'})"
    terminalreporter.write_sep("-", line)
