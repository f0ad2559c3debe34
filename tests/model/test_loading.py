"""Checkpoint loading: sharded files, dtype choice, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenmill import LLM, SamplingParams
from tokenmill.config import resolve_dtype
from tokenmill.model.hf_config import load_hf_config


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_matches_single_file(checkpoint_factory, tmp_path):
    src = checkpoint_factory("llama")
    dst = copy_ckpt(src, tmp_path / "sharded")
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, dst / fname)
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = [{"prompt_token_ids": [5, 6, 7, 8]}]
    a = LLM(str(src), dtype="float32").generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    b = LLM(str(dst), dtype="float32").generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


def test_unknown_architecture_is_named(checkpoint_factory, tmp_path):
    dst = copy_ckpt(checkpoint_factory("llama"), tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_hf_config(dst)


def test_sliding_window_is_refused(checkpoint_factory, tmp_path):
    dst = copy_ckpt(checkpoint_factory("llama"), tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], sliding_window=64)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding_window=64"):
        load_hf_config(dst)


def test_truncated_weights_name_the_file(checkpoint_factory, tmp_path):
    dst = copy_ckpt(checkpoint_factory("llama"), tmp_path / "m")
    path = dst / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        LLM(str(dst), dtype="float32")


def test_missing_and_misshapen_tensors(checkpoint_factory, tmp_path):
    dst = copy_ckpt(checkpoint_factory("llama"), tmp_path / "m")
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        LLM(str(dst), dtype="float32")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight.*shape \(3, 3\)"):
        LLM(str(dst), dtype="float32")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        LLM(str(tmp_path))


def test_auto_dtype_follows_cpu_flags(monkeypatch, caplog):
    from tokenmill import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert not caplog.records
    # Asked for explicitly, bf16 runs there too: through the kernels' 16-bit products
    # silently, without them with one line saying PyTorch's emulation is the slow choice.
    from tokenmill.model import kernels

    monkeypatch.setattr(kernels, "cpu_kernels", lambda: object())
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert not caplog.records
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert "without bf16 matrix instructions (avx512) and without tokenmill's CPU kernels" in caplog.text
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int3", torch.device("cpu"))


def test_kv_capacity_must_hold_one_sequence(checkpoint_factory):
    with pytest.raises(ValueError, match="KV cache holds 64 tokens.*max_model_len=256"):
        LLM(str(checkpoint_factory("llama")), dtype="float32", block_size=16, num_kv_blocks=4)
