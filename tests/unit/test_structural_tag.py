"""vLLM's structural_tag: free text, and every trigger starts one of its structures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tokenmill
from tokenmill.structured import GrammarCompiler, StructuredOutputError, StructuredOutputsParams
from tokenmill.tokenizer import Tokenizer

TAG = {"type": "structural_tag", "triggers": ["<function="], "structures": [
    {"begin": "<function=get_weather>", "end": "</function>",
     "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"begin": "<function=get_time>", "end": "</function>", "schema": {"type": "object", "properties": {}}},
]}


@pytest.fixture(scope="module")
def takes():
    tok = Tokenizer.from_dir(Path(tokenmill.__file__).parent / "demo_model")
    compiler = GrammarCompiler(tok.backend.to_str(), tok.vocab_size, [tok.eos_token_id])

    def takes(tag, text: str) -> bool:
        matcher = compiler.matcher(StructuredOutputsParams(structural_tag=tag))
        return (all(matcher.consume_token(t) for t in tok.encode(text, add_special_tokens=False))
                and matcher.is_accepting())
    return takes


@pytest.mark.parametrize("text, ok", [
    ("No call at all.", True),
    ('Let me check. <function=get_weather>{"city":"Oslo"}</function> Done.', True),
    ('<function=get_time>{}</function><function=get_weather>{"city":"Rome"}</function>', True),
    ('<function=get_weather>{"town":"Oslo"}</function>', False),  # not the schema (objects closed)
    ("<function=send_mail>{}</function>", False),  # the trigger starts none of this
    ('<function=get_weather>{"city":"Oslo"}', False),  # no end
])
def test_text_and_structures(takes, text, ok):
    assert takes(TAG, text) is ok
    assert takes(json.dumps(TAG), text) is ok  # vLLM sends it as JSON text


@pytest.mark.parametrize("tag, message", [
    ("{not json", "not valid JSON"),
    ({**TAG, "triggers": []}, "triggers must be"),
    ({**TAG, "structures": [{"begin": "<tool>", "end": "</tool>", "schema": {}}]}, "starts with none of the triggers"),
    ({**TAG, "structures": [{"begin": "<function=f>", "schema": {}}]}, "begin and end"),
    ({**TAG, "structures": [{"begin": "<function=f>", "end": "", "schema": {"type": "wat"}}]}, "wat"),
])
def test_malformed_tags_are_errors_naming_the_field(takes, tag, message):
    with pytest.raises(StructuredOutputError, match=message):
        takes(tag, "x")
