"""How a model family writes tool calls: the grammar that keeps them well-formed, and the
parser that reads them back out of the output text.

Every tool request is decoded under the format's grammar (tool_choice "auto" too: free text
until the format's trigger, then nothing but well-formed calls), so the parser reads exact
literals rather than guessing at what a model might have meant.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.structured.lark import TEXT_TERMINAL, json_value, text_then
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
    parallel_calls: bool = True  # whether the family's templates render several calls in one turn

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
            lines += [f"start: TEXT | text_then_trigger {calls}", text_then("text_then_trigger", self.trigger),
                      TEXT_TERMINAL]
        else:
            lines.append(f"start: %json {text_schema} | {_lit(self.trigger)} {calls}")
        for i, tool in enumerate(tools):
            lines.append(f"fn_{i}: {_lit(self.head + tool.name + self.mid)} {json_value(tool.parameters)} "
                         f"{_lit(self.tail)}")
        return "\n".join(lines) + "\n"

    def split(self, text: str, final: bool,
              scanners: dict[int, JsonValueScanner] | None = None) -> tuple[str, list[PartialCall]]:
        """(content, calls) of the output so far.

        Args:
            final: the output is complete. While it is not, a tail of the text that could
                still become the trigger is held back from the content.
            scanners: kept by a caller that splits the same growing text again and again
                (streaming), so each arguments value is scanned once, not once per call.
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
            scanner = scanners.get(value_start) if scanners is not None else None
            if scanner is None:
                scanner = JsonValueScanner(value_start)
                if scanners is not None:
                    scanners[value_start] = scanner
            value_end = scanner.end(text)
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
# Llama 3.1-3.3's templates refuse a turn of several calls, so their models make one.
LLAMA3_JSON = ToolCallFormat("llama3_json", trigger='{"name"', head=': "', mid='", "parameters": ',
                             tail="}", separator="; ", parallel_calls=False)


class JsonValueScanner:
    """Finds where the compact JSON value starting at `start` ends (the grammar writes no
    whitespace outside strings), resuming where the last scan stopped: a streamed call's
    arguments grow a few characters per step, and scanning them whole each time would cost
    time quadratic in their length."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._pos, self._depth, self._in_string, self._escaped = start, 0, False, False
        self._end: int | None = None

    def end(self, text: str) -> int | None:
        """Index just past the value in `text` (which only grows between calls), None while
        the value is not complete."""
        if self._end is not None:
            return self._end
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        for i in range(self._pos, len(text)):
            c = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
                    if depth == 0:
                        self._end = i + 1
                        return self._end
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                if depth == 0:  # closes what holds a number, true, false or null
                    self._end = i
                    return i
                depth -= 1
                if depth == 0:
                    self._end = i + 1
                    return self._end
            elif depth == 0 and c in ",;\n ":  # the end of a number, true, false or null
                self._end = i
                return i
        self._pos, self._depth, self._in_string, self._escaped = len(text), depth, in_string, escaped
        return None


def json_value_end(text: str, pos: int) -> int | None:
    """Index just past the JSON value that starts at text[pos], None if it is not complete."""
    return JsonValueScanner(pos).end(text)


def _expect(text: str, pos: int, literal: str) -> int | None:
    """pos past `literal` if text has it at pos, else None (also while it is incomplete)."""
    return pos + len(literal) if text.startswith(literal, pos) else None


def _prefix_overlap(text: str, literal: str) -> int:
    """The length of the longest tail of `text` that begins `literal`."""
    for n in range(min(len(literal) - 1, len(text)), 0, -1):
        if literal.startswith(text[-n:]):
            return n
    return 0
