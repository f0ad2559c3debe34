"""AWQ and GPTQ checkpoints, packed in the test from the published layouts
(quant_factory.py), loaded with LLM(): each projection's stored blocks decode to the plain
dequantization of the checkpoint (exactly for Q4_0 / Q8_0, within the documented float16
rounding of m = -zero * scale for Q4_1), and the native engine stays within a KL bound of
the same checkpoint dequantized at load (quantization="none")."""

from __future__ import annotations

import json

import pytest
import torch
from quant_factory import reference_weight, write_quantized

from tokenmill import LLM, SamplingParams
from tokenmill.model.gguf.quant_types import Q4_0, Q4_1, Q8_0
from tokenmill.model.loader import _shard_sizes

# Big enough for whole groups of 128 on every projection (in = 128 or 256).
SHAPE = dict(hidden_size=128, intermediate_size=256)
PROMPT = [(7 * i + 3) % 300 + 3 for i in range(48)]
# Native vs dequantized differ by the int8 rounding of activations only: measured mean KLD
# 0.015-0.025 on these random models (whose int4 versions are themselves KLD 1-2 from the
# float model). A zero point off by one (v1 read as v2) measured 7.8.
MAX_MEAN_KLD = 0.1

CASES = {
    # name: (method, group size, options, the block format it must become)
    "awq-g32": ("awq", 32, {}, Q4_1),
    "awq-g128-no-zero-point": ("awq", 128, {"sym": True}, Q4_0),
    "gptq-v1-sym-g128": ("gptq", 128, {"sym": True}, Q4_0),
    "gptq-v1-asym-g32-act-order": ("gptq", 32, {"desc_act": True}, Q4_1),
    "gptq-v2-asym-g128-act-order": ("gptq", 128, {"desc_act": True, "v1": False}, Q4_1),
    "gptq-v1-asym-g128": ("gptq", 128, {}, Q4_1),
    "gptq-8bit-sym-g32": ("gptq", 32, {"sym": True, "bits": 8}, Q8_0),
}
_HF_PARTS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
             "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
             "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", 0)}


def _stored_part(model, hf_name: str, num_rows: int):
    """The StoredWeight that holds a checkpoint projection (model.layers.i.<...>.x_proj.weight)
    and the projection's rows in it (adjacent parts of one format are merged at load)."""
    _, _, layer, block, proj, _ = hf_name.split(".")
    module, index = _HF_PARTS[proj]
    linear = model.model.layers[int(layer)].get_submodule(module)
    first = sum(_shard_sizes(model.config, module.rpartition(".")[2])[:index]) if index else 0
    part_first, part = next((r, w) for r, w in linear.stored if r <= first < r + w.shape[0])
    return part, torch.arange(first - part_first, first - part_first + num_rows)


def _prompt_logprobs(model: str, quantization: str) -> tuple[LLM, torch.Tensor]:
    """Full log-probability rows [P - 1, vocab] of every prompt position."""
    llm = LLM(model, dtype="float32", quantization=quantization)
    rows = []
    llm.engine.runner.prompt_logprobs_sink = lambda _rid, _first, lps: rows.append(lps.clone())
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                 use_tqdm=False)
    return llm, torch.cat(rows)


def mean_kld(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((ref.exp() * (ref - other)).sum(-1).mean())


def q4_1_bound(reference: torch.Tensor, zero_times_scale: torch.Tensor) -> torch.Tensor:
    """|decoded - reference| bound for Q4_1: m = -z*s rounded to float16 (half an ulp: 2^-11
    relative, 2^-25 absolute below float16's normal range) plus the float32 rounding of d*q + m."""
    return zero_times_scale.abs() * 2**-11 + 2**-25 + reference.abs() * 2**-24


@pytest.mark.usefixtures("requires_cpu_kernels")
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_as_its_plain_dequantization(checkpoint_factory, tmp_path, case):
    method, group_size, options, ggml_type = CASES[case]
    path = tmp_path / case
    reference = write_quantized(checkpoint_factory("llama", **SHAPE), path, method, group_size, **options)
    native, native_lps = _prompt_logprobs(str(path), "auto")
    model = native.engine.runner.model
    num_reordered = 0
    for name, (q, z, s, group) in reference.items():
        expected = reference_weight(q, z, s, group)  # [out, in] float32, exact
        part, rows = _stored_part(model, name, expected.shape[0])
        assert part.ggml_type == ggml_type, name
        out_of_order = bool((group[1:] < group[:-1]).any())  # act-order with more than one group
        assert (part.input_perm is not None) == out_of_order, name
        num_reordered += out_of_order
        decoded = part.decode_rows(rows)
        if ggml_type == Q4_1:  # d * q + m: the float16 rounding of m = -z * s only
            zero_times_scale = (z * s.float())[:, group]
            assert ((decoded - expected).abs() <= q4_1_bound(expected, zero_times_scale)).all(), name
        else:
            assert torch.equal(decoded, expected), name
    assert (num_reordered > 0) == options.get("desc_act", False)
    _, reference_lps = _prompt_logprobs(str(path), "none")
    kld = mean_kld(reference_lps, native_lps)
    assert 0 < kld < MAX_MEAN_KLD, kld


def test_unsupported_configs_are_refused_naming_the_key(checkpoint_factory, tmp_path):
    path = tmp_path / "m"
    write_quantized(checkpoint_factory("llama", **SHAPE), path, "gptq", 128)
    config = json.loads((path / "config.json").read_text())
    for key, value in [("bits", 3), ("checkpoint_format", "marlin"), ("quant_method", "bitsandbytes")]:
        bad = {**config, "quantization_config": {**config["quantization_config"], key: value}}
        (path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"config.json.*quantization_config\.{key}={value!r}"):
            LLM(str(path), dtype="float32")
    # Tensors packed for groups of 128 under a config that says 32: the tensor is named.
    bad = {**config, "quantization_config": {**config["quantization_config"], "group_size": 32}}
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.\d\.\S+\.scales has shape \(\d+, \d+\); .* implies"):
        LLM(str(path), dtype="float32")


def test_without_kernels_the_checkpoint_is_dequantized_at_load(checkpoint_factory, tmp_path, monkeypatch):
    """No CPU kernels (or a GPU): every projection is the plain dequantization, as with
    quantization="none"."""
    from tokenmill.model import kernels

    path = tmp_path / "gptq"
    write_quantized(checkpoint_factory("llama", **SHAPE), path, "gptq", 32, desc_act=True)
    _, reference_lps = _prompt_logprobs(str(path), "none")
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
    llm, fallback_lps = _prompt_logprobs(str(path), "auto")
    assert not llm.engine.runner.model.model.layers[0].mlp.down_proj.stored
    assert (fallback_lps - reference_lps).abs().max() < 1e-4
