"""Tokenizer: loading a checkpoint directory, parity with transformers, chat templates."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from tokenizer_factory import (
    SIMPLE_TEMPLATE,
    build_byte_level,
    build_llama3_like,
    build_qwen_like,
    build_sentencepiece_like,
)

from tokenmill.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    " Hello  there, the quick   brown fox!",
    "tokens\nstream\n\n  to the user",
    "你好，世界 😀 and ünïcödé",
    "",
    "<s>Hello</s> <|im_end|> <|begin_of_text|>",
]

MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Hello there! 你好"},
    {"role": "assistant", "content": "Hello, the user."},
    {"role": "user", "content": "How are you today?"},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "bytelevel": build_byte_level(root / "bl", ["<|bos|>", "<|eos|>"], config={"eos_token": "<|eos|>"}),
        "bytelevel_bos": build_byte_level(
            root / "blb", ["<|bos|>", "<|eos|>"], bos="<|bos|>",
            config={"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": SIMPLE_TEMPLATE},
        ),
        "sp_metaspace": build_sentencepiece_like(root / "spm"),
        "sp_normalizer": build_sentencepiece_like(root / "spn", use_metaspace_pre_tokenizer=False),
        "llama3": build_llama3_like(root / "l3"),
        "qwen": build_qwen_like(root / "qw"),
    }


@pytest.fixture(scope="module")
def hf(checkpoints):
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in checkpoints.items()}


def _hf_ids(out):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), 4 a list.
    return list(out) if isinstance(out, list) else list(out["input_ids"])


@pytest.mark.parametrize("name", ["bytelevel", "bytelevel_bos", "sp_metaspace", "sp_normalizer", "llama3", "qwen"])
def test_encode_decode_match_transformers(checkpoints, hf, name):
    tok = Tokenizer.from_dir(checkpoints[name])
    ref = hf[name]
    assert tok.vocab_size == len(ref)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
            )


def test_byte_fallback_really_used(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["sp_metaspace"])
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("你", add_special_tokens=False)]
    assert pieces[-3:] == ["<0xE4>", "<0xBD>", "<0xA0>"]
    assert tok.decode(tok.encode("你好 😀")) == "你好 😀"


def test_bos_is_added_only_by_the_post_processor(checkpoints):
    plain = Tokenizer.from_dir(checkpoints["bytelevel"])
    with_bos = Tokenizer.from_dir(checkpoints["bytelevel_bos"])
    assert plain.encode("Hello")[0] != 0 and not plain.adds_bos_token
    assert with_bos.encode("Hello")[0] == with_bos.bos_token_id == 0 and with_bos.adds_bos_token
    assert with_bos.encode("Hello", add_special_tokens=False) == plain.encode("Hello")


def test_special_token_ids(checkpoints, hf):
    llama3 = Tokenizer.from_dir(checkpoints["llama3"])
    assert llama3.bos_token_id == 0
    assert llama3.eos_token_id == 4  # <|eot_id|>, the tokenizer's own eos
    assert llama3.eos_token_ids == {1, 4}  # plus generation_config's <|end_of_text|>
    assert llama3.model_max_length == 131072
    assert set(hf["llama3"].all_special_ids) <= set(llama3.all_special_ids)

    qwen = Tokenizer.from_dir(checkpoints["qwen"])
    assert qwen.bos_token_id is None and qwen.bos_token is None
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == 2  # dict-form token
    assert qwen.eos_token_ids == {0, 2}
    assert qwen.model_max_length is None  # transformers' 1e30 "no limit"
    assert qwen.all_special_ids == [0, 1, 2]

    sp = Tokenizer.from_dir(checkpoints["sp_metaspace"])
    assert (sp.bos_token_id, sp.eos_token_id, sp.eos_token_ids) == (1, 2, {2})


def test_generation_config_fills_missing_tokens(tmp_path):
    d = build_byte_level(tmp_path, ["<|a|>", "<|b|>"], generation_config={"bos_token_id": 0, "eos_token_id": 1})
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (0, 1, {1})
    assert (tok.bos_token, tok.eos_token) == (None, None)  # as transformers: template sees none


def test_added_tokens_decoder_adds_missing_tokens(tmp_path):
    d = build_byte_level(tmp_path, ["<|a|>"], config={
        "added_tokens_decoder": {"400": {"content": "<|tool|>", "special": True}}
    })
    tok = Tokenizer.from_dir(d)
    tool_id = tok.token_to_id("<|tool|>")
    assert tool_id is not None and tool_id in tok.all_special_ids
    assert tok.encode("x<|tool|>y", add_special_tokens=False)[1] == tool_id
    assert tok.decode(tok.encode("x<|tool|>y")) == "xy"


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = build_byte_level(tmp_path / "ok", ["<|a|>"])
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)


def test_decode_token_keeps_sentencepiece_space(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["sp_metaspace"])
    ids = tok.encode("hello world", add_special_tokens=False)
    assert "".join(tok.decode_token(i) for i in ids) == " hello world"
    bl = Tokenizer.from_dir(checkpoints["bytelevel"])
    assert "".join(bl.decode_token(i) for i in bl.encode(" the end")) == " the end"


# ---- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bytelevel_bos", "llama3", "qwen"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(checkpoints, hf, name, add_generation_prompt):
    tok = Tokenizer.from_dir(checkpoints[name])
    ref = hf[name]
    for messages in (MESSAGES, MESSAGES[1:2]):
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        assert ids == _hf_ids(ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt
        ))


def test_encode_chat_has_a_single_bos(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["llama3"])
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.encode(tok.apply_chat_template(MESSAGES))[:2] == [0, 0]  # what encode_chat avoids


def test_chat_template_tools_tojson_matches_transformers(checkpoints, hf):
    tok = Tokenizer.from_dir(checkpoints["qwen"])
    tools = [{"name": "lookup", "description": "Find <things> & 東西", "parameters": {"q": "str"}}]
    text = tok.apply_chat_template(MESSAGES, tools=tools)
    assert '"Find <things> & 東西"' in text  # not HTML-escaped, not ASCII-escaped
    assert text == hf["qwen"].apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)


def test_content_parts_are_joined(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["qwen"])
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "a\nb"}])
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_none_fields_are_dropped(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["bytelevel_bos"])
    template = "{% for m in messages %}{{ 'tool_calls' in m }}{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "x", "tool_calls": None}],
                                   chat_template=template) == "False"


def test_raise_exception_strftime_and_extra_variables(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["llama3"])
    with pytest.raises(ValueError, match="Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    template = "{{ strftime_now('%Y') }}|{{ enable_thinking }}|{{ eos_token }}"
    out = tok.apply_chat_template(MESSAGES, chat_template=template, enable_thinking=False)
    assert out == f"{datetime.now().year}|False|<|eot_id|>"


def test_template_sandbox_blocks_unsafe_access(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["qwen"])
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")


def test_no_chat_template_is_a_clear_error(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["bytelevel"])
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_chat_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    d = build_byte_level(tmp_path / "a", ["<|a|>"], config={"chat_template": named})
    assert Tokenizer.from_dir(d).chat_template == "D"
    (d / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["chat_template"] == named  # the file on disk is untouched
