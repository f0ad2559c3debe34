"""OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, read and checked once; the
tool calls a model made."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from tokenmill.structured import StructuredOutputError
from tokenmill.structured.schema import closed_objects

# OpenAI's rule for function names; it also keeps names safe inside the grammar's literals.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A function declared without `parameters` takes none (OpenAI's meaning).
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class FunctionTool:
    """One callable function: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI tool object, as chat templates receive it in `tools`."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolsRequest:
    """What a request asks of tools.

    choice: "auto" (the model decides: text, or calls that the grammar keeps well-formed),
    "required" (at least one call), or one function's name (exactly a call of it).
    "none" is not represented: such a request has no ToolsRequest.
    parallel: whether one reply may hold several calls.
    """

    tools: tuple[FunctionTool, ...]
    choice: str = "auto"
    parallel: bool = True

    def callable_tools(self) -> tuple[FunctionTool, ...]:
        """The functions the output may call under `choice`."""
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolsRequest | None:
        """From the request's fields (OpenAI shapes); None when no tool may be called.
        StructuredOutputError naming the field when malformed."""
        if tool_choice is not None and not tools and tool_choice != "none":
            raise StructuredOutputError("tool_choice needs tools.", "tool_choice")
        if not tools:
            return None
        if not isinstance(tools, list):
            raise StructuredOutputError("tools must be an array of tool objects.", "tools")
        parsed = tuple(_function_tool(t, i) for i, t in enumerate(tools))
        names = [t.name for t in parsed]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise StructuredOutputError(f"tools declares the function {duplicate!r} twice.", "tools")
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise StructuredOutputError("parallel_tool_calls must be a boolean.", "parallel_tool_calls")
        choice = _choice(tool_choice, names)
        if choice is None:
            return None
        return cls(parsed, choice, parallel_tool_calls is not False)


def _function_tool(tool: Any, i: int) -> FunctionTool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise StructuredOutputError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}; "
                                    "only function tools are supported.", where)
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise StructuredOutputError(f"{where}.function must be an object.", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise StructuredOutputError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'; got {name!r}.",
                                    f"{where}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise StructuredOutputError(f"{where}.function.description must be a string.", f"{where}.function.description")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = _NO_PARAMETERS
    elif not isinstance(parameters, dict):
        raise StructuredOutputError(f"{where}.function.parameters must be a JSON schema object.",
                                    f"{where}.function.parameters")
    else:  # checked alone (under a millisecond), so the error names the tool
        error = llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_json_schema(json.dumps(closed_objects(parameters))))
        if error:
            raise StructuredOutputError(f"{where}.function.parameters is not a JSON schema tokenmill can enforce: "
                                        f"{' '.join(error.split())[:300]}", f"{where}.function.parameters")
    return FunctionTool(name, description, parameters)


def _choice(tool_choice: Any, names: list[str]) -> str | None:
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return "required"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise StructuredOutputError(f"tool_choice names the function {name!r}, which is not in tools.",
                                        "tool_choice")
        return name
    raise StructuredOutputError("tool_choice must be 'none', 'auto', 'required' or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")


def arguments_object(arguments: Any, param: str) -> dict[str, Any]:
    """An assistant message's tool-call arguments (JSON text, as OpenAI sends them) as the
    object chat templates expect; StructuredOutputError if it is not a JSON object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise StructuredOutputError(f"{param} must be a JSON object (as text).", param)
    return value
