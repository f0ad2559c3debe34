"""How a model family writes tool calls: the grammar that keeps them well-formed, and the
parser that reads them back out of the output text.

Every tool request is decoded under the format's grammar (tool_choice "auto" too: free text
until the format's trigger, then nothing but well-formed calls), so the parser reads exact
literals rather than guessing at what a model might have meant.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.structured.lark import TEXT_TERMINAL, json_value
from tokenmill.structured.lark import literal as _lit
from tokenmill.tools.spec import FunctionTool


@dataclass(frozen=True)
class PartialCall:
    """One call as far as the text goes (reported once its name is complete): `arguments`
    is the JSON text written so far (never more than the arguments value), `done` once the
    call closed."""

    name: str
    arguments: str
    done: bool


@dataclass(frozen=True)
class ToolCallFormat:
    """A call is `trigger head NAME mid ARGUMENTS tail`; several are joined by `separator`.

    The trigger starts the calls anywhere in the output; text before it is the message's
    content.
    """

    name: str
    trigger: str
    head: str
    mid: str
    tail: str
    separator: str

    def render(self, calls: list[tuple[str, str]]) -> str:
        """(name, arguments JSON) pairs as the model writes them: past assistant turns."""
        return self.separator.join(f"{self.trigger}{self.head}{name}{self.mid}{args}{self.tail}" for name, args in calls)

    def grammar(self, tools: tuple[FunctionTool, ...], choice: str, parallel: bool,
                text_schema: str | None = None) -> str:
        """A llguidance Lark grammar for the output.

        Args:
            tools: the functions that may be called.
            choice: "auto" (text, or calls after the trigger) or "required"/a name (calls only).
            parallel: whether several calls may follow one another.
            text_schema: in "auto", a JSON schema (text) the non-call answer must match
                (the request's response_format); free text when None.
        """
        functions = " | ".join(f"fn_{i}" for i in range(len(tools)))
        lines = ["%llguidance {}"]
        calls = f"({functions})" + (f" ({_lit(self.separator + self.trigger)} ({functions}))*" if parallel else "")
        # The separator alone may end the output too: a model that starts a new line after
        # a call can still stop there instead of being forced into another call.
        calls += f" {_lit(self.separator)}?" if parallel else ""
        if choice != "auto":
            lines.append(f"start: {_lit(self.trigger)} {calls}")
        elif text_schema is None:
            # Lazy: the text ends at the first trigger, so a trigger always starts a real call.
            lines += [f"start: TEXT | text_then_trigger {calls}",
                      f"text_then_trigger[lazy]: TEXT {_lit(self.trigger)}",
                      TEXT_TERMINAL]
        else:
            lines.append(f"start: %json {text_schema} | {_lit(self.trigger)} {calls}")
        for i, tool in enumerate(tools):
            lines.append(f"fn_{i}: {_lit(self.head + tool.name + self.mid)} {json_value(tool.parameters)} "
                         f"{_lit(self.tail)}")
        return "\n".join(lines) + "\n"

    def split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        """(content, calls) of the output so far.

        Args:
            final: the output is complete. While it is not, a tail of the text that could
                still become the trigger is held back from the content.
        """
        start = text.find(self.trigger)
        if start < 0:
            return text if final else text[: len(text) - _prefix_overlap(text, self.trigger)], []
        calls: list[PartialCall] = []
        pos: int | None = start + len(self.trigger)
        while pos is not None:
            name_start = _expect(text, pos, self.head)
            name_end = text.find('"', name_start) if name_start is not None else -1
            value_start = _expect(text, name_end, self.mid) if name_end >= 0 else None
            if value_start is None:  # the name is not complete yet
                break
            name = text[name_start:name_end]  # type: ignore[misc]  # name_start is set when value_start is
            value_end = json_value_end(text, value_start)
            if value_end is None:
                calls.append(PartialCall(name, text[value_start:], False))
                break
            pos = _expect(text, value_end, self.tail)
            calls.append(PartialCall(name, text[value_start:value_end], pos is not None))
            if pos is not None:
                pos = _expect(text, pos, self.separator + self.trigger)
        return text[:start], calls


# The formats of the chat templates tokenmill knows. Hermes is Qwen2/2.5/3's (and tokenmill's
# own prompt for templates that render no tools); llama3_json is Llama 3.1+'s JSON calls.
HERMES = ToolCallFormat("hermes", trigger="<tool_call>", head='\n{"name": "', mid='", "arguments": ',
                        tail="}\n</tool_call>", separator="\n")
LLAMA3_JSON = ToolCallFormat("llama3_json", trigger='{"name"', head=': "', mid='", "parameters": ',
                             tail="}", separator="; ")
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}


def json_value_end(text: str, pos: int) -> int | None:
    """Index just past the JSON value that starts at text[pos], None if it is not complete
    yet. The value is compact (the grammar writes no whitespace outside strings)."""
    depth, in_string, escaped = 0, False, False
    for i in range(pos, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:  # closes what holds a number, true, false or null
                return i
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and c in ",;\n ":  # the end of a number, true, false or null
            return i
    return None


def _expect(text: str, pos: int, literal: str) -> int | None:
    """pos past `literal` if text has it at pos, else None (also while it is incomplete)."""
    return pos + len(literal) if text.startswith(literal, pos) else None


def _prefix_overlap(text: str, literal: str) -> int:
    """The length of the longest tail of `text` that begins `literal`."""
    for n in range(min(len(literal) - 1, len(text)), 0, -1):
        if literal.startswith(text[-n:]):
            return n
    return 0
