"""`tokenmill quantize`: int8 and int4 (g32, g128) copies of the demo model load and run
natively, their weights within half a quantization step of the originals; AWQ's folded
scales leave the float model unchanged and lower the projections' output error; a GGUF
source becomes a complete Hugging Face checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf_factory import hf_to_gguf
from safetensors.torch import load_file, save_file

from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.config import DEMO_MODEL_DIR
from tokenmill.model.gguf.quant_types import Q4_1, Q8_0
from tokenmill.model.hf_config import load_model_config
from tokenmill.quant.awq import fold_scales, search_scales
from tokenmill.quant.calibration import capture_layer_inputs
from tokenmill.quant.convert import QuantizeOptions, read_float_tensors
from tokenmill.quant.layouts import unpack_awq, unpack_int8
from tokenmill.tokenizer import Tokenizer

TEXT = "/work/shared/data/tinyshakespeare.txt"  # read in place, never copied
CALIBRATION_TOKENS = 512
VARIANTS = {"int8": ["--method", "int8"], "int4-g32": ["--method", "int4", "--group-size", "32"],
            "int4-g128": ["--method", "int4", "--group-size", "128"]}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The demo model quantized by the command line, once per variant."""
    root, made = tmp_path_factory.mktemp("quantized"), {}

    def get(variant: str) -> str:
        if variant not in made:
            args = VARIANTS.get(variant) or ["--method", "int4", "--awq", "--calibration-text", TEXT,
                                             "--calibration-tokens", str(CALIBRATION_TOKENS)]
            assert main(["quantize", DEMO_MODEL_DIR, str(root / variant), *args]) == 0
            made[variant] = str(root / variant)
        return made[variant]

    return get


@pytest.mark.usefixtures("requires_cpu_kernels")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_demo_model_loads_runs_and_stays_within_half_a_step(quantized, variant):
    path = quantized(variant)
    original = load_file(f"{DEMO_MODEL_DIR}/model.safetensors")
    written = load_file(f"{path}/model.safetensors")
    num_checked = 0
    for name, w in original.items():
        module = name.removesuffix(".weight")
        if f"{module}.qweight" in written:
            g = unpack_awq(written[f"{module}.qweight"], written[f"{module}.qzeros"], written[f"{module}.scales"],
                           int(variant.rsplit("g", 1)[1]))
        elif f"{module}.weight_scale" in written:
            g = unpack_int8(written[f"{module}.weight"], written[f"{module}.weight_scale"])
        else:  # embeddings and norms stay as they were
            assert torch.equal(written[name], w), name
            continue
        step = g.scales.float()[:, g.group]  # [out, in]
        assert ((g.dequantize() - w.float()).abs() <= step / 2 * (1 + 1e-6)).all(), name
        num_checked += 1
    assert num_checked == 7 * 6
    config = json.loads(open(f"{path}/config.json").read())["quantization_config"]
    assert config["quant_method"] == ("tokenmill" if variant == "int8" else "awq")
    llm = LLM(path, dtype="float32")
    assert {w.ggml_type for _, w in llm.engine.runner.model.model.layers[0].mlp.gate_up_proj.stored} == {
        Q8_0 if variant == "int8" else Q4_1}
    out = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12 and out[0].outputs[0].text.strip()


def _float_inputs(windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """The float demo model's inputs to each layer's q/k/v and gate/up projections."""
    llm = LLM(DEMO_MODEL_DIR, dtype="float32", quantization="none", enable_prefix_caching=False)
    inputs, handles = {}, []
    for i, layer in enumerate(llm.engine.runner.model.model.layers):
        for leaf in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            hook = (lambda key: lambda _m, args: inputs.setdefault(key, []).append(args[0].detach().clone()))(
                f"model.layers.{i}.{leaf}")
            handles.append(layer.get_submodule(leaf).register_forward_pre_hook(hook))
    llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1), use_tqdm=False)
    return {k: torch.cat(v) for k, v in inputs.items()}


def _dequantized(path: str, names: list[str]) -> torch.Tensor:
    t = load_file(f"{path}/model.safetensors")
    parts = [unpack_awq(t[f"{n}.qweight"], t[f"{n}.qzeros"], t[f"{n}.scales"], 128).dequantize() for n in names]
    return torch.cat(parts)  # [sum of outs, in]


def test_awq_lowers_the_projection_output_error_on_calibration_data(quantized):
    """Measured from the written files alone: for q/k/v and gate, AWQ's input scale is the
    ratio of the original to the folded norm weight, so each quantized projection's output
    on the float model's calibration inputs compares with the original's."""
    ids = Tokenizer.from_dir(DEMO_MODEL_DIR).encode(open(TEXT).read(CALIBRATION_TOKENS * 8))[:CALIBRATION_TOKENS]
    inputs = _float_inputs([ids])  # the tokens --awq calibrated on, in its one window of 512
    original = load_file(f"{DEMO_MODEL_DIR}/model.safetensors")
    folded = load_file(f"{quantized('int4-g128-awq')}/model.safetensors")
    plain_error = awq_error = 0.0
    for key, x in inputs.items():  # x [tokens, in]
        layer, proj = key.rsplit(".", 1)[0].rsplit(".", 1)
        block, norm = (("self_attn", "input_layernorm") if "qkv" in key else ("mlp", "post_attention_layernorm"))
        # up_proj's rows also carry down_proj's inverse scale: of gate/up, gate alone compares.
        names = [f"{layer}.{block}.{p}_proj" for p in (("q", "k", "v") if "qkv" in key else ("gate",))]
        w = torch.cat([original[f"{n}.weight"].float() for n in names])
        s = original[f"{layer}.{norm}.weight"].float() / folded[f"{layer}.{norm}.weight"].float()  # [in]
        y = x @ w.t()
        plain_error += float(((x @ _dequantized(quantized("int4-g128"), names).t() - y) ** 2).mean())
        awq_error += float((((x / s) @ _dequantized(quantized("int4-g128-awq"), names).t() - y) ** 2).mean())
    print(f"projection output MSE: plain int4 g128 {plain_error:.5f}, AWQ {awq_error:.5f}")
    # Measured on the demo model: AWQ's error is 0.977x plain int4's on these projections (the
    # search's own report, with down_proj, says 3-12% per layer; a small, outlier-free model).
    assert awq_error < plain_error, (awq_error, plain_error)


def _prompt_logprobs(model: str) -> torch.Tensor:
    llm = LLM(model, dtype="float32", quantization="none")
    rows = []
    llm.engine.runner.prompt_logprobs_sink = lambda _rid, _first, lps: rows.append(lps.clone())
    prompt = [(5 * i + 11) % 300 + 3 for i in range(40)]
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.cat(rows)


def _write_float_copy(src: str, dst, tensors: dict[str, torch.Tensor]) -> str:
    shutil.copytree(src, dst)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return str(dst)


def test_awq_scales_fold_without_changing_the_float_model(tmp_path):
    """The searched scales of the demo model (grouped-query attention: q/k/v, gate/up, down)."""
    cfg, tensors = read_float_tensors(DEMO_MODEL_DIR)
    inputs = capture_layer_inputs(DEMO_MODEL_DIR, TEXT, 256)
    searches = search_scales(tensors, cfg, inputs, QuantizeOptions("int4").fake_quantize)
    assert any(r.alpha > 0 for r in searches)
    folded = {k: v.float() for k, v in tensors.items()}
    fold_scales(folded, searches)
    before = _prompt_logprobs(_write_float_copy(DEMO_MODEL_DIR, tmp_path / "ref", {k: v.float() for k, v in tensors.items()}))
    after = _prompt_logprobs(_write_float_copy(DEMO_MODEL_DIR, tmp_path / "folded", folded))
    assert (after - before).abs().max() < 1e-3


def test_awq_fold_of_v_into_o_and_biases(checkpoint_factory, tmp_path):
    """Full multi-head attention (v_proj square to o_proj) with biases: every fold AutoAWQ
    does for Llama, with random scales."""
    src = checkpoint_factory("llama", num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    cfg, tensors = read_float_tensors(src)
    from tokenmill.quant.awq import ScaleSearch, scale_groups

    gen = torch.Generator().manual_seed(0)
    groups = [g for i in range(cfg.num_layers) for g in scale_groups(cfg, set(tensors), i)]
    assert any(g.input_name.endswith("o_proj") for g in groups) and any(n.endswith(".bias") for g in groups
                                                                         for n in g.divided)
    in_width = {g.input_name: tensors[g.linears[0]].shape[1] for g in groups}
    searches = [ScaleSearch(g, torch.rand(in_width[g.input_name], generator=gen) * 1.5 + 0.5, 0.5, 0.0, 0.0)
                for g in groups]
    folded = dict(tensors)
    fold_scales(folded, searches)
    before = _prompt_logprobs(str(src))
    after = _prompt_logprobs(_write_float_copy(str(src), tmp_path / "folded", folded))
    assert (after - before).abs().max() < 1e-3


def test_gguf_source_becomes_a_complete_checkpoint(checkpoint_factory, tmp_path):
    model_dir = checkpoint_factory("llama")
    gguf_path = hf_to_gguf(model_dir, tmp_path / "m.gguf", quant={"ffn_up.weight": QT.Q8_0})
    dst = tmp_path / "int8"
    assert main(["quantize", str(gguf_path), str(dst), "--method", "int8"]) == 0
    assert load_model_config(dst) == load_model_config(gguf_path)
    from_gguf, from_dir = Tokenizer.from_gguf(gguf_path), Tokenizer.from_dir(dst)
    for text in ["ROMEO: But soft, what light", "  two  spaces\n\nand 12345 </s> <s>x"]:
        assert from_dir.encode(text) == from_gguf.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert from_dir.encode_chat(chat) == from_gguf.encode_chat(chat)
    out = LLM(str(dst), dtype="float32").generate("ROMEO:", SamplingParams(temperature=0, max_tokens=4),
                                                  use_tqdm=False)
    assert out[0].outputs[0].token_ids


def test_refusals(tmp_path, quantized):
    assert main(["quantize", quantized("int8"), str(tmp_path / "again"), "--method", "int8"]) == 1  # already quantized
    assert main(["quantize", DEMO_MODEL_DIR, str(tmp_path / "x"), "--method", "int8", "--group-size", "32"]) == 2
    assert main(["quantize", DEMO_MODEL_DIR, str(tmp_path / "x"), "--method", "int4", "--awq"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["quantize", DEMO_MODEL_DIR, str(tmp_path / "full"), "--method", "int8"]) == 1
