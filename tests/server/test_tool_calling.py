"""Tool calling through the official openai client and LangChain, on the real model: every
call's arguments are parsed and validated against the tool's schema, none sampled away."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_harness import MODEL_NAME, serve_real_model

pytestmark = pytest.mark.usefixtures("requires_cpu_kernels")


class Weather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


class Convert(BaseModel):
    """Convert an amount of money between currencies."""

    amount: float = Field(ge=0, le=1_000_000)
    currency_from: str = Field(pattern=r"^[A-Z]{3}$")
    currency_to: str = Field(pattern=r"^[A-Z]{3}$")


ARGUMENTS = {"get_weather": Weather, "convert": Convert}
TOOLS = [{"type": "function", "function": {"name": name, "description": model.__doc__,
                                           "parameters": model.model_json_schema()}}
         for name, model in ARGUMENTS.items()]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


server = pytest.fixture(serve_real_model, scope="module", name="server")


def validated(call) -> BaseModel:
    """The call's arguments as the tool's model: fails unless they are valid."""
    assert call.type == "function" and call.id.startswith("call_")
    return ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)


def test_round_trip_call_result_answer(client, server):
    first = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=100, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and validated(call).city == "Paris"
    conversation = [*QUESTION, choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    # The call and its result are in the prompt of the next turn.
    with server.client() as http:
        prompt = http.post("/tokenize", json={"model": MODEL_NAME, "messages": conversation, "tools": TOOLS,
                                               "return_token_strs": True}).json()
    text = "".join(prompt["token_strs"])
    assert '"name": "get_weather", "arguments": {"city": "Paris"' in text
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in text
    final = client.chat.completions.create(model=MODEL_NAME, messages=conversation, tools=TOOLS, tool_choice="none",
                                           max_tokens=60, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # The same turn streamed: the same answer, as content deltas.
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=conversation, tools=TOOLS,
                                                 tool_choice="none", max_tokens=60, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == final.choices[0].message.content
    assert not any(c.choices[0].delta.tool_calls for c in chunks)


def test_streamed_calls_match_the_whole_response(client):
    kwargs = dict(model=MODEL_NAME, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=150,
                  temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = content = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        choice = chunk.choices[0]
        content = content or choice.delta.content
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            assert d.id is None or d.id == entry["id"]
            entry["arguments"] += d.function.arguments or ""
    assert not content and finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for c in whole.message.tool_calls:
        validated(c)


def test_named_choice_calls_that_function_once(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "I have 100 euros. How many dollars is that?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "convert"}}, max_tokens=100,
        temperature=0.8, n=3, seed=11)
    for choice in out.choices:
        [call] = choice.message.tool_calls
        assert call.function.name == "convert" and choice.finish_reason == "tool_calls"
        validated(call)


def test_auto_every_call_is_valid(client):
    """Under "auto" the model chooses; whatever it chooses, calls are well-formed."""
    out = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=TOOLS, max_tokens=120,
                                         temperature=1.0, n=6, seed=7)
    for choice in out.choices:
        calls = choice.message.tool_calls or []
        assert (choice.finish_reason == "tool_calls") == bool(calls) or choice.finish_reason == "length"
        for call in calls:
            validated(call)
        if not calls:
            assert "<tool_call>" not in (choice.message.content or "")


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=5, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body
    client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=2)  # still serving


def test_bad_tool_messages_are_400s(client):
    bad_arguments = {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}
    for message, param in [(bad_arguments, "messages[1].tool_calls[0].function.arguments"),
                           ({"role": "tool", "tool_call_id": "c"}, "messages[1].content")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_NAME, messages=[*QUESTION, message], max_tokens=5)
        assert err.value.body["param"] == param, err.value.body


# ---- LangChain ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL_NAME,
                                       temperature=0, max_tokens=200, max_retries=0)


class Movie(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1900, le=2030)
    genres: list[Literal["drama", "comedy", "action", "horror"]] = Field(min_length=1, max_length=2)


def test_langchain_with_structured_output(chat_model):
    for method in ("json_schema", "function_calling"):  # response_format, and a forced tool call
        movie = chat_model.with_structured_output(Movie, method=method).invoke("Recommend a movie.")
        assert isinstance(movie, Movie), method


def test_langchain_bind_tools(chat_model):
    message = chat_model.bind_tools([Weather, Convert], tool_choice="Weather").invoke("Weather in Lisbon?")
    [call] = message.tool_calls
    assert call["name"] == "Weather" and call["id"].startswith("call_")
    Weather.model_validate(call["args"])
    streamed = None
    for chunk in chat_model.bind_tools([Weather], tool_choice="any").stream("Weather in Lisbon?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls and all(Weather.model_validate(c["args"]) for c in streamed.tool_calls)
