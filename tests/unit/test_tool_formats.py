"""Tool-call formats: the grammar accepts exactly the calls the parser reads; streamed deltas
add up to the parsed calls; templates are recognised; past calls and results render."""

from __future__ import annotations

from pathlib import Path

import llguidance
import pytest

import tokenmill
from tokenmill.structured import StructuredOutputError, StructuredOutputsParams
from tokenmill.tokenizer import Tokenizer
from tokenmill.tools import ToolsRequest, ToolTemplate
from tokenmill.tools.formats import HERMES, LLAMA3_JSON, json_value_end

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: takes none

# Minimal templates in the two native styles (the tool parts as Qwen2.5 and Llama 3.1 write them).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
)
LLAMA_TEMPLATE = (
    "{% if tools %}Respond with {\"name\": function name, \"parameters\": arguments}.{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{\"name\": \"{{ c.function.name }}\", \"parameters\": {{ c.function.arguments | tojson }}}"
    "{% endfor %}{% endfor %}"
)


@pytest.fixture(scope="module")
def lltokenizer():
    tok = Tokenizer.from_dir(Path(tokenmill.__file__).parent / "demo_model")
    return tok, llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=[tok.eos_token_id])


def accepts(lltokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar takes `text` whole (and may end there)."""
    tok, llt = lltokenizer
    matcher = llguidance.LLMatcher(llt, llguidance.grammar_from("grammar", grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return all(matcher.consume_token(t) for t in tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON], ids=lambda f: f.name)
def test_grammar_takes_exactly_well_formed_calls(lltokenizer, fmt):
    request = ToolsRequest.parse([WEATHER, CLOCK])
    one = fmt.render([("get_weather", '{"city":"Oslo","unit":"celsius"}')])
    two = fmt.render([("get_weather", '{"city":"Oslo","unit":"celsius"}'), ("get_time", "{}")])
    auto = fmt.grammar(request.tools, "auto", parallel=True)
    assert accepts(lltokenizer, auto, "It is sunny.")
    assert accepts(lltokenizer, auto, "Let me look. " + two)
    assert not accepts(lltokenizer, auto, fmt.render([("get_weather", '{"city":"Oslo","unit":"kelvin"}')]))
    assert not accepts(lltokenizer, auto, fmt.render([("get_weather", '{"city":"Oslo"}')]))  # missing unit
    assert not accepts(lltokenizer, auto, fmt.render([("send_mail", "{}")]))  # not a declared tool
    assert not accepts(lltokenizer, auto, fmt.render([("get_time", '{"tz":"UTC"}')]))  # takes no arguments
    required = fmt.grammar(request.tools, "required", parallel=False)
    assert accepts(lltokenizer, required, one)
    assert not accepts(lltokenizer, required, two)  # parallel_tool_calls=false: one call
    assert not accepts(lltokenizer, required, "It is sunny.")
    named = fmt.grammar(ToolsRequest.parse([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}})
                        .callable_tools(), "get_time", parallel=False)
    assert accepts(lltokenizer, named, fmt.render([("get_time", "{}")]))
    assert not accepts(lltokenizer, named, one)


def test_a_json_answer_or_calls(lltokenizer):
    grammar = HERMES.grammar(ToolsRequest.parse([WEATHER]).tools, "auto", parallel=True, text_schema='{"type": "object"}')
    assert accepts(lltokenizer, grammar, '{"a":1}')
    assert accepts(lltokenizer, grammar, HERMES.render([("get_weather", '{"city":"Oslo","unit":"celsius"}')]))
    assert not accepts(lltokenizer, grammar, "plain text")
    # Llama 3's calls are JSON themselves: a JSON answer could not be told from a call.
    with pytest.raises(StructuredOutputError, match="JSON"):
        ToolTemplate(LLAMA3_JSON, True).constraint(ToolsRequest.parse([WEATHER]), StructuredOutputsParams(json_object=True))


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON], ids=lambda f: f.name)
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_streamed_deltas_add_up_to_the_parsed_calls(fmt, step):
    calls = [("get_weather", '{"city":"S\\"ao {Paulo}","unit":"celsius"}'), ("get_time", "{}")]
    text = "Checking: " + fmt.render(calls)
    template = ToolTemplate(fmt, native=True)
    content, parsed = template.parse(text)
    assert content == "Checking: " and [(c.name, c.arguments) for c in parsed] == calls
    stream = template.stream()
    streamed_content, by_index = "", {}
    for i in range(0, len(text), step):
        piece, deltas = stream.feed(text[i:i + step], final=i + step >= len(text))
        streamed_content += piece
        for d in deltas:
            entry = by_index.setdefault(d["index"], {"id": d.get("id"), "name": d["function"].get("name"), "arguments": ""})
            assert "id" not in d or entry["id"] == d["id"]  # the id and name come once
            entry["arguments"] += d["function"]["arguments"]
    assert streamed_content == content and stream.called
    assert [(e["name"], e["arguments"]) for e in by_index.values()] == calls
    assert all(e["id"].startswith("call_") for e in by_index.values())


def test_text_without_calls_and_calls_cut_short():
    template = ToolTemplate(HERMES, native=False)
    assert template.parse("No tools needed.") == ("No tools needed.", [])
    cut = "<tool_call>\n" + '{"name": "get_weather", "arguments": {"city":"Os'
    assert template.parse(cut) == (cut, [])  # max_tokens cut the only call: all of it is content
    stream = template.stream()
    assert stream.feed("Hi <tool", final=False) == ("Hi ", [])  # a possible trigger is held back
    assert stream.feed("box>", final=True) == ("<toolbox>", [])
    assert json_value_end('{"a":[1,{"b":"}"}]}, rest', 0) == 19
    assert json_value_end('{"a":"\\"', 0) is None


def test_templates_are_recognised():
    assert ToolTemplate.of(HERMES_TEMPLATE) == ToolTemplate(HERMES, True)
    assert ToolTemplate.of(LLAMA_TEMPLATE) == ToolTemplate(LLAMA3_JSON, True)
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
    assert ToolTemplate.of(chatml) == ToolTemplate(HERMES, False)
    assert ToolTemplate.of(None) == ToolTemplate(HERMES, False)


CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 4}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"note": "windy"}'},
]


def test_native_templates_get_tools_and_call_objects():
    from tokenmill.chat_template import render_chat_template
    request = ToolsRequest.parse([WEATHER])
    messages, variables = ToolTemplate.of(HERMES_TEMPLATE).messages(CONVERSATION, request)
    assert variables["tools"][0]["function"]["name"] == "get_weather"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "unit": "celsius"}
    text = render_chat_template(HERMES_TEMPLATE, messages, True, variables)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in text
    assert "<|im_start|>tool\n{\"celsius\": 4}" in text


def test_templates_without_tools_get_tokenmills_prompt():
    request = ToolsRequest.parse([WEATHER])
    messages, variables = ToolTemplate(HERMES, native=False).messages(
        [{"role": "system", "content": "Be brief."}, *CONVERSATION], request)
    assert variables == {}
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == HERMES.render([("get_weather", '{"city": "Oslo", "unit": "celsius"}')])
    # Consecutive results: one user turn.
    assert messages[3] == {"role": "user", "content": '<tool_response>\n{"celsius": 4}\n</tool_response>\n'
                                                      '<tool_response>\n{"note": "windy"}\n</tool_response>'}
    assert len(messages) == 4
    # tool_choice "none": past turns still render, the tools are not offered.
    messages, _ = ToolTemplate(HERMES, native=False).messages(CONVERSATION, None)
    assert messages[0]["role"] == "user"


@pytest.mark.parametrize("tools, choice, parallel, param", [
    (None, "auto", None, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
    ([WEATHER], "sometimes", None, "tool_choice"),
    ([{"type": "retrieval"}], None, None, "tools[0]"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, None, "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, None, "tools"),
    ([WEATHER], None, "yes", "parallel_tool_calls"),
])
def test_bad_tool_fields_name_the_field(tools, choice, parallel, param):
    with pytest.raises(StructuredOutputError) as err:
        ToolsRequest.parse(tools, choice, parallel)
    assert err.value.param == param


def test_tool_choice_none_and_combinations():
    assert ToolsRequest.parse([WEATHER], "none") is None
    assert ToolsRequest.parse(None, "none") is None
    template = ToolTemplate(HERMES, native=False)
    required = ToolsRequest.parse([WEATHER], "required")
    with pytest.raises(StructuredOutputError):
        template.constraint(required, StructuredOutputsParams(json={"type": "object"}))
    with pytest.raises(StructuredOutputError):
        template.constraint(ToolsRequest.parse([WEATHER]), StructuredOutputsParams(regex="a+"))
    # A JSON response_format under "auto": the answer that is not a call must be a JSON object.
    grammar = template.constraint(ToolsRequest.parse([WEATHER]), StructuredOutputsParams(json_object=True)).grammar
    assert 'start: %json {"type": "object"} | "<tool_call>"' in grammar


def test_llama3_models_make_one_call_per_turn(lltokenizer):
    """Llama 3's templates refuse a turn of several calls, so its grammar allows one."""
    grammar = ToolTemplate(LLAMA3_JSON, True).constraint(ToolsRequest.parse([WEATHER, CLOCK], "required"), None).grammar
    assert accepts(lltokenizer, grammar, LLAMA3_JSON.render([("get_time", "{}")]))
    assert not accepts(lltokenizer, grammar, LLAMA3_JSON.render([("get_time", "{}"), ("get_time", "{}")]))


def test_objects_are_closed_except_under_all_of():
    from tokenmill.structured.schema import closed_objects
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}}}}
    closed = closed_objects(nested)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed_objects({"type": "object"}) == {"type": "object"}  # any object stays any object
    assert closed_objects({**nested, "additionalProperties": True})["additionalProperties"] is True
    combined = {"allOf": [{"properties": {"a": {}}, "required": ["a"]}, {"properties": {"b": {}}}]}
    assert closed_objects(combined) == combined  # closing each part would forbid the other's keys
