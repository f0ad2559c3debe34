"""What tools change about a chat request, shared by the server and `LLM.chat`: the prompt
(tools, past calls and their results through the chat template), the grammar, and reading
the calls back out of the output, whole or as streamed deltas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta

from tokenmill.chat_template import content_text
from tokenmill.structured import StructuredOutputError, StructuredOutputsParams
from tokenmill.tools.formats import HERMES, LLAMA3_JSON, JsonValueScanner, ToolCallFormat
from tokenmill.tools.spec import ToolCall, ToolsRequest, arguments_object, new_call_id

# tokenmill's own instructions, for chat templates that render no tools (SmolLM2's, for one).
_SYSTEM_PROMPT = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with\n<tool_call>\n"
    '{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n</tool_call>\n'
    "A function's result comes back in <tool_response></tool_response>."
)


@dataclass(frozen=True)
class ToolTemplate:
    """How one chat template takes tools: the call format, and whether the template renders
    the tools and tool messages itself (`native`) or tokenmill writes them into the messages."""

    format: ToolCallFormat
    native: bool

    @staticmethod
    @lru_cache(maxsize=16)  # one parse of the template per process, not per request
    def of(source: str | None) -> ToolTemplate:
        """Recognised from the template's text: one that reads `tools` and writes <tool_call>
        (Qwen2, 2.5, 3) or "parameters" JSON (Llama 3.1+) renders them itself; any other
        gets tokenmill's prompt in the Hermes format."""
        if source and "tools" in _template_variables(source):
            if "<tool_call>" in source:
                return ToolTemplate(HERMES, True)
            if '"parameters"' in source:
                return ToolTemplate(LLAMA3_JSON, True)
        return ToolTemplate(HERMES, False)

    def messages(self, messages: list[dict[str, Any]], tools: ToolsRequest | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(messages, template variables) for the chat template.

        Args:
            messages: OpenAI-shaped messages: assistant turns may carry `tool_calls`, `tool`
                turns the results.
            tools: the request's tools; None when none may be called (tool_choice "none").
        """
        out: list[dict[str, Any]] = []
        results_turn = False  # out[-1] is a user turn of tool results (tokenmill's rendering)
        for i, m in enumerate(messages):
            m = dict(m)
            calls = [_past_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.pop("tool_calls", None) or [])]
            if self.native:
                if calls:
                    m["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                                       for cid, name, args in calls]
            elif calls:
                text = self.format.render([(name, json.dumps(args, ensure_ascii=False)) for _, name, args in calls])
                m["content"] = f"{content_text(m.get('content'))}\n{text}" if m.get("content") else text
            elif m["role"] == "tool":
                response = f"<tool_response>\n{content_text(m['content'])}\n</tool_response>"
                if results_turn:  # one user turn holds consecutive results
                    out[-1]["content"] += "\n" + response
                else:
                    out.append({"role": "user", "content": response})
                results_turn = True
                continue
            out.append(m)
            results_turn = False
        if tools is None:
            return out, {}
        if self.native:
            return out, {"tools": [t.as_openai() for t in tools.tools]}
        listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools.tools)
        prompt = _SYSTEM_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{content_text(out[0]['content'])}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
        return out, {}

    def constraint(self, tools: ToolsRequest, response: StructuredOutputsParams | None) -> StructuredOutputsParams:
        """The grammar of a tool request's output. A JSON response_format stays the shape of
        a non-call answer under tool_choice "auto"; other combinations are refused."""
        text_schema = None
        if response is not None:
            kind, text = response.grammar_source
            if kind != "json_schema" or tools.choice != "auto":
                raise StructuredOutputError("a structured output constraint combines with tools only as a JSON "
                                            "response_format under tool_choice 'auto'.", "tool_choice")
            if self.format.trigger.startswith("{"):
                raise StructuredOutputError(f"this model writes tool calls as JSON ({self.format.name}), so a JSON "
                                            "response_format could not be told from a call; send one of them.",
                                            "response_format")
            text_schema = text
        # A named tool_choice asks for exactly one call of it (OpenAI's meaning).
        parallel = tools.parallel and tools.choice in ("auto", "required") and self.format.parallel_calls
        return StructuredOutputsParams(
            grammar=self.format.grammar(tools.callable_tools(), tools.choice, parallel, text_schema))

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; content is None when only calls were written.
        Without a complete call (max_tokens cut the only one short) all the text is content."""
        content, partial = self.format.split(text, final=True)
        calls = [ToolCall(new_call_id(), c.name, c.arguments) for c in partial if c.done]
        if not calls:
            return text, []
        return (content if content.strip() else None), calls

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.format)


class ToolCallStream:
    """One choice's streamed output as OpenAI deltas: content until the first call, then
    each call's id and name once, then its arguments as they are written."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self._format = fmt
        self._text = ""
        self._content_sent = 0
        self._ids: list[str] = []
        self._arguments_sent: list[int] = []
        self._scanners: dict[int, JsonValueScanner] = {}  # the calls' arguments, scanned once

    @property
    def called(self) -> bool:
        return bool(self._ids)

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new tool_calls deltas) once `text` is appended to the output."""
        self._text += text
        content, calls = self._format.split(self._text, final, self._scanners)
        new_content = content[self._content_sent:]
        self._content_sent = len(content)
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            if i == len(self._ids):
                self._ids.append(new_call_id())
                self._arguments_sent.append(0)
                deltas.append({"index": i, "id": self._ids[i], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            piece = call.arguments[self._arguments_sent[i]:]
            if piece:
                self._arguments_sent[i] = len(call.arguments)
                if deltas and deltas[-1]["index"] == i and "id" in deltas[-1]:
                    deltas[-1]["function"]["arguments"] = piece
                else:
                    deltas.append({"index": i, "function": {"arguments": piece}})
        return new_content, deltas


def _template_variables(source: str) -> set[str]:
    """The variables a chat template reads (none if it does not parse: rendering says why)."""
    try:
        ast = jinja2.Environment(extensions=[jinja2.ext.loopcontrols]).parse(source)
    except jinja2.TemplateError:
        return set()
    return jinja2.meta.find_undeclared_variables(ast)


def _past_call(call: Any, param: str) -> tuple[str, str, dict[str, Any]]:
    """(id, name, arguments object) of a tool call in an assistant message."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise StructuredOutputError(f"{param} must be {{\"id\", \"type\": \"function\", \"function\": "
                                    "{\"name\", \"arguments\"}}.", param)
    return str(call.get("id") or ""), fn["name"], arguments_object(fn.get("arguments", "{}"), f"{param}.function.arguments")
