"""GGUF loading on synthetic files: dequantization bit-exact against the `gguf` package's
reference, the reader against gguf-py's, llama.cpp's q/k row order undone, and tiny
checkpoints converted to GGUF running exactly as from safetensors (refusals:
test_gguf_refusals.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf_factory import hf_reference_weights, hf_to_gguf, llama_cpp_permute, random_blocks

from tokenmill import LLM, SamplingParams
from tokenmill.model.gguf.dequant import dequantize
from tokenmill.model.gguf.reader import GGUFFile
from tokenmill.model.gguf.weights import iter_gguf_weights, unpermute_rotary
from tokenmill.model.hf_config import load_model_config

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
BLOCK_TYPES = ALL_TYPES[3:]
# gguf-py quantizes these (the K types it only dequantizes).
QUANTIZABLE = [QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]


def assert_bit_exact(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    # Compare the bits: NaN == NaN, and -0.0 != 0.0.
    assert np.array_equal(ours.numpy().view(np.uint32), np.asarray(ref, dtype=np.float32).view(np.uint32))


# ---- dequantization ------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_every_bit_pattern_matches_reference(qtype):
    """Fully random blocks: every byte value in every field, NaN/inf scales included."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, size=(96, 4 * block_bytes), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qtype)
    assert_bit_exact(dequantize(raw, int(qtype), ref.shape), ref)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_many_blocks_matches_reference(qtype):
    """More blocks than one dequantization chunk, finite scales (realistic weights)."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, num_rows=40, row_len=block_size * 300, seed=1)  # 12,000 blocks
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.isfinite(ref).all()
    assert_bit_exact(dequantize(raw, int(qtype), ref.shape), ref)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_quantized_weights_matches_reference(qtype):
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    assert_bit_exact(dequantize(raw.view(np.uint8).reshape(64, -1), int(qtype), ref.shape), ref)
    assert np.abs(ref - x).max() < 0.5  # the round trip is a sane approximation


def test_dequantize_f16_and_f32():
    x = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32)
    assert_bit_exact(dequantize(x.view(np.uint8), int(QT.F32), x.shape), x)
    h = x.astype(np.float16)
    assert_bit_exact(dequantize(h.view(np.uint8), int(QT.F16), x.shape), h.astype(np.float32))


# ---- the container -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory):
    """A GGUF holding one tensor of each supported type (and a 3-D one), written by gguf-py."""
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_int32("test.i32", -7)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo ✓")
    w.add_array("test.strs", ["a", "", "Ġb"])
    w.add_array("test.ints", [1, 2, 3])
    for i, qtype in enumerate(ALL_TYPES):
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        if qtype == QT.F32:
            w.add_tensor("t.F32", np.random.default_rng(i).standard_normal((3, 5, 64)).astype(np.float32))
        elif qtype == QT.F16:
            w.add_tensor("t.F16", np.random.default_rng(i).standard_normal((7, 64)).astype(np.float16))
        else:
            w.add_tensor(f"t.{qtype.name}", random_blocks(qtype, 6, block_size * 2, seed=i), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reader_matches_gguf_reader(every_type_file):
    ours = GGUFFile(every_type_file)
    ref = gguf.GGUFReader(str(every_type_file))
    for key in ("test.u32", "test.i32", "test.f32", "test.bool", "test.str", "test.strs", "test.ints"):
        assert ours.metadata[key] == ref.fields[key].contents(), key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    reference = hf_reference_weights(every_type_file)
    for name, info in ours.tensors.items():
        assert info.shape == tuple(reference[name].shape)
        assert_bit_exact(dequantize(ours.raw_blocks(name), info.ggml_type, info.shape), reference[name].numpy())


def test_reader_refuses_non_gguf_and_truncated(tmp_path, every_type_file):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(bad)
    data = every_type_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"cut\.gguf: tensor 't\.Q6_K'.*truncated"):
        GGUFFile(cut)
    cut.write_bytes(data[:200])
    with pytest.raises(ValueError, match="truncated GGUF file"):
        GGUFFile(cut)


# ---- layout: llama.cpp's q/k row permutation -----------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 3, 4])
def test_unpermute_inverts_llama_cpp_permutation(num_heads):
    w = np.random.default_rng(0).standard_normal((num_heads * 16, 24)).astype(np.float32)
    permuted = llama_cpp_permute(w, num_heads)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rotary(torch.from_numpy(permuted), num_heads).numpy(), w)
    bias = w[:, 0].copy()
    assert np.array_equal(unpermute_rotary(torch.from_numpy(llama_cpp_permute(bias, num_heads)), num_heads).numpy(), bias)


def test_unpermuted_rows_rotate_like_llama_cpp():
    """Why the permutation exists: rotating adjacent pairs of the permuted rows (llama.cpp)
    equals rotating the halves of the original rows (Hugging Face) after our un-permutation."""
    head_dim, angle = 8, torch.linspace(0.1, 1.2, 4)
    q = torch.randn(head_dim)
    # Hugging Face: rotate (x_i, x_{i + D/2}).
    x1, x2 = q[: head_dim // 2], q[head_dim // 2 :]
    hf = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()))
    # llama.cpp: rotate (x_{2i}, x_{2i+1}) of the permuted vector.
    p = torch.from_numpy(llama_cpp_permute(q.numpy()[:, None], 1)[:, 0])
    a, b = p[0::2], p[1::2]
    rotated = torch.stack((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()), dim=1).reshape(-1)
    assert torch.allclose(unpermute_rotary(rotated, 1), hf, atol=1e-6)


# ---- whole checkpoints ---------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3, 250, 8], [40, 41, 42], list(range(10, 47))]


def _greedy(model: str, **engine_args):
    llm = LLM(model, dtype="float32", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return llm, [(o.outputs[0].token_ids, [{k: v.logprob for k, v in lp.items()} for lp in o.outputs[0].logprobs])
                 for o in outs]


@pytest.mark.parametrize("arch", ["llama", "llama-mqa", "qwen2", "qwen3", "llama3-rope-tied"])
def test_f32_gguf_runs_exactly_like_safetensors(checkpoint_factory, tmp_path, arch):
    """Same weights, bit for bit, through GGUF names, the permutation and tied/untied heads:
    the same tokens and the same logprobs as the safetensors checkpoint."""
    model_dir = checkpoint_factory(arch)
    extra, rope_freqs = {}, None
    if arch == "llama3-rope-tied":
        # llama.cpp stores Llama 3 rope scaling as per-frequency factors.
        from tokenmill.model.layers.rotary import _llama3_inv_freq

        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
        rope_freqs = (inv / _llama3_inv_freq(inv, scaling)).numpy()
        extra = {"rope.scaling.original_context_length": 64}
    path = hf_to_gguf(model_dir, tmp_path / f"{arch}.gguf", extra_metadata=extra, rope_freqs=rope_freqs)
    hf_cfg, gguf_cfg = load_model_config(model_dir), load_model_config(path)
    # GGUF stores eps as float32 (1e-6 reads back as 9.99999997e-07, the same float32).
    assert gguf_cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-7)
    # transformers 5 keeps rope_theta inside the scaling dict; the rest must match.
    hf_scaling = {k: v for k, v in (hf_cfg.rope_scaling or {}).items() if k != "rope_theta"} or None
    assert gguf_cfg == hf_cfg.__class__(**{**hf_cfg.__dict__, "eos_token_ids": gguf_cfg.eos_token_ids,
                                           "rms_norm_eps": gguf_cfg.rms_norm_eps, "rope_scaling": hf_scaling})
    llm_gguf, from_gguf = _greedy(str(path))
    _, from_dir = _greedy(str(model_dir))
    assert from_gguf == from_dir
    # The tokenizer rebuilt from metadata encodes like the checkpoint's tokenizer.json.
    from tokenmill.tokenizer import Tokenizer

    ref_tok = Tokenizer.from_dir(model_dir)
    for text in ["ROMEO: But soft, what light", "  two  spaces\n\nand 12345 </s> <s>x"]:
        assert llm_gguf.get_tokenizer().encode(text) == ref_tok.encode(text)
    assert llm_gguf.get_tokenizer().encode_chat([{"role": "user", "content": "hi"}]) == ref_tok.encode_chat(
        [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_weights_load_as_reference_dequantization(checkpoint_factory, tmp_path, arch):
    """Each loaded tensor equals gguf-py's dequantization of the stored blocks, un-permuted."""
    quant = {"attn_q.weight": QT.Q8_0, "attn_k.weight": QT.Q4_0, "attn_v.weight": QT.Q5_1,
             "ffn_up.weight": QT.Q4_1, "ffn_down.weight": QT.Q5_0, "token_embd.weight": QT.Q8_0}
    path = hf_to_gguf(checkpoint_factory(arch), tmp_path / "q.gguf", quant=quant)
    cfg = load_model_config(path)
    reference = hf_reference_weights(path)
    ref_types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert ref_types["blk.0.attn_k.weight"] == QT.Q4_0
    from gguf_factory import gguf_name

    loaded = dict(iter_gguf_weights(GGUFFile(path), cfg))
    for hf, value in loaded.items():
        expected = reference[gguf_name(hf)]
        if arch == "llama" and ".q_proj." in hf:
            expected = unpermute_rotary(expected, cfg.num_heads)
        elif arch == "llama" and ".k_proj." in hf:
            expected = unpermute_rotary(expected, cfg.num_kv_heads)
        assert torch.equal(value, expected), hf
    # And the engine runs it natively as it runs the dequantized file (float32 gate rows
    # fused with Q4_1 up rows included): the same distributions up to int8 activations.
    _assert_close_to_dequantized(path)


@pytest.mark.usefixtures("requires_cpu_kernels")
@pytest.mark.parametrize("quant", [{"ffn_gate.weight": QT.Q8_0}, {"ffn_up.weight": QT.Q4_1, "attn_v.weight": QT.Q5_1}])
def test_stored_and_float_parts_of_one_projection(checkpoint_factory, tmp_path, quant):
    """A fused projection whose parts differ (quantized and float32, the float part first
    or last) runs natively like the dequantized file."""
    path = hf_to_gguf(checkpoint_factory("llama", hidden_size=256, intermediate_size=512), tmp_path / "m.gguf",
                      quant=quant)
    llm = LLM(str(path), dtype="float32")
    mlp = llm.engine.runner.model.model.layers[0].mlp
    assert [w.ggml_type for _, w in mlp.gate_up_proj.stored] == [int(quant.get("ffn_gate.weight", 0)),
                                                                 int(quant.get("ffn_up.weight", 0))]
    _assert_close_to_dequantized(path)


def _assert_close_to_dequantized(path) -> None:
    """Teacher-forced log-probabilities of a prompt, native vs dequantized: int8 activations
    move them by a few hundredths on these random models (0.047 at most measured; float
    activations agree to 5e-6), a wrong kernel or a lost part by far more (1e5 seen)."""
    diffs = [abs(a - b) for a, b in zip(_prompt_logprobs(path, "auto"), _prompt_logprobs(path, "none"), strict=True)]
    assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.1, diffs


def _prompt_logprobs(path, quantization: str) -> list[float]:
    llm = LLM(str(path), dtype="float32", quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": PROMPTS[2]}, params, use_tqdm=False)[0]
    return [next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]]
