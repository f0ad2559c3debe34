"""Random-weight checkpoints from published configs, and `bench throughput` on a tiny one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from tokenmill.bench import model_configs
from tokenmill.bench.model_configs import (
    MODEL_CONFIGS,
    ArchConfig,
    build_checkpoint,
    cached_checkpoint,
)
from tokenmill.bench.store import Store
from tokenmill.bench.throughput import (
    ThroughputSpec,
    make_prompts,
    run_throughput,
    throughput_record,
)

TINY_LLAMA = replace(MODEL_CONFIGS["llama-3.2-1b"], name="tiny-llama", hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                     bos_token_id=1, eos_token_id=2)
TINY_QWEN = replace(MODEL_CONFIGS["qwen2.5-0.5b"], name="tiny-qwen", hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def test_published_configs():
    smol, qwen, llama = (MODEL_CONFIGS[k] for k in ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"))
    assert (smol.hidden_size, smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads,
            smol.intermediate_size, smol.vocab_size, smol.rope_theta) == (576, 30, 9, 3, 1536, 49152, 100000.0)
    assert 134e6 < smol.num_params < 136e6  # SmolLM2-135M
    assert qwen.has_qkv_bias and qwen.hf_config()["model_type"] == "qwen2" and qwen.rms_norm_eps == 1e-6
    assert 0.49e9 < qwen.num_params < 0.5e9  # Qwen2.5-0.5B: 494M
    cfg = llama.hf_config()
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["max_position_embeddings"] == 131072
    assert 1.23e9 < llama.num_params < 1.24e9  # Llama-3.2-1B: 1.236B
    assert all(c.tie_word_embeddings for c in MODEL_CONFIGS.values())


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_QWEN], ids=lambda c: c.name)
def test_checkpoint_layout_and_hf_loading(cfg: ArchConfig, tmp_path, word_tokenizer):
    out = build_checkpoint(cfg, tmp_path / cfg.name, tokenizer_dir=Path(word_tokenizer.path).parent)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert str(f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype) == "torch.bfloat16"
        assert f.get_tensor("model.norm.weight").float().eq(1).all()
        std = f.get_tensor("model.embed_tokens.weight").float().std().item()
    assert abs(std - 0.02) < 0.002
    assert names == set(cfg.tensor_shapes())
    assert ("model.layers.1.self_attn.k_proj.bias" in names) == cfg.has_qkv_bias
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == [cfg.architecture]

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_key_value_heads == 2


def test_tokenizer_is_copied_only_when_it_covers_the_vocabulary(tmp_path, word_tokenizer):
    src = Path(word_tokenizer.path).parent  # 502 tokens
    covered = build_checkpoint(TINY_LLAMA, tmp_path / "covered", tokenizer_dir=src)  # 300-token model
    assert (covered / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # A tokenizer smaller than the model's vocabulary (the demo model's 4,096 tokens against
    # 49k-152k) would decode most generated ids to nothing: the placeholder covers them all.
    big = replace(TINY_LLAMA, vocab_size=1024)
    ckpt = build_checkpoint(big, tmp_path / "big", tokenizer_dir=src)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tok.get_vocab_size() == big.vocab_size
    assert tok.decode([big.vocab_size - 1])  # every id decodes to some text
    assert (ckpt / "tokenizer.json").read_bytes() != (src / "tokenizer.json").read_bytes()


def test_cached_checkpoint_moves_to_a_full_vocab_tokenizer(tmp_path, monkeypatch, word_tokenizer):
    src = Path(word_tokenizer.path).parent  # stands in for the demo model: 502 tokens
    cfg = replace(TINY_LLAMA, name="tiny-big-vocab", vocab_size=1024)
    monkeypatch.setitem(model_configs.MODEL_CONFIGS, cfg.name, cfg)
    monkeypatch.setattr(model_configs, "DEMO_MODEL_DIR", src)
    ckpt = cached_checkpoint(cfg.name, tmp_path)
    # As cached before the fix: the small tokenizer copied in, with its special-tokens map.
    shutil.copyfile(src / "tokenizer.json", ckpt / "tokenizer.json")
    (ckpt / "special_tokens_map.json").write_text("{}")
    weights = (ckpt / "model.safetensors").stat()

    assert cached_checkpoint(cfg.name, tmp_path) == ckpt
    assert Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size() == cfg.vocab_size
    assert not (ckpt / "special_tokens_map.json").exists()
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns  # refreshed, not rebuilt


def test_cached_checkpoint_rejects_unknown_name(tmp_path):
    with pytest.raises(KeyError, match="smollm2-135m"):
        cached_checkpoint("gpt-5", tmp_path)


def test_hf_throughput_backend_on_tiny_model(tmp_path, db_path):
    model_dir = build_checkpoint(TINY_LLAMA, tmp_path / "tiny", tokenizer_dir=None)
    spec = ThroughputSpec(str(model_dir), backend="hf", num_prompts=4, input_len=8, output_len=5,
                          max_num_seqs=2, dtype="float32")
    prompts = make_prompts(spec, 300, {1, 2})
    assert len(prompts) == 4 and all(len(p) == 8 and n == 5 and not {1, 2} & set(p) for p, n in prompts)
    result = run_throughput(spec)
    assert (result.num_requests, result.total_input_tokens, result.total_output_tokens) == (4, 32, 20)
    assert result.elapsed_s > 0 and result.output_tokens_per_s == pytest.approx(20 / result.elapsed_s)
    with Store(db_path) as store:
        run_id = store.save(throughput_record(spec, result, "tiny-llama"))
        saved = store.get_run(run_id)
    assert saved.kind == "throughput" and saved.summary["output_throughput"] == result.output_tokens_per_s
    assert saved.server["name"] == "hf"


def test_tokenmill_throughput_backend_on_tiny_model(tmp_path):
    model_dir = build_checkpoint(TINY_LLAMA, tmp_path / "tiny", tokenizer_dir=None)  # placeholder vocab
    spec = ThroughputSpec(str(model_dir), backend="tokenmill", num_prompts=4, input_len=8, output_len=5,
                          max_num_seqs=2, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    result = run_throughput(spec)
    assert (result.num_requests, result.total_output_tokens) == (4, 20)


def test_tokenmill_throughput_backend_on_a_gguf_file(checkpoint_factory, tmp_path):
    """A GGUF file is a model too: the workload's vocabulary and special ids come from its metadata."""
    from tests.model.gguf_factory import hf_to_gguf

    path = hf_to_gguf(checkpoint_factory("llama"), tmp_path / "tiny.gguf")
    spec = ThroughputSpec(str(path), backend="tokenmill", num_prompts=3, input_len=8, output_len=4,
                          max_num_seqs=2, dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    result = run_throughput(spec)
    assert (result.num_requests, result.total_input_tokens, result.total_output_tokens) == (3, 24, 12)
