"""Pieces of the llguidance Lark grammars tokenmill writes (tool calls, structural tags)."""

from __future__ import annotations

import json
from typing import Any

from tokenmill.structured.schema import closed_objects

# Any text, newlines included.
TEXT_TERMINAL = r"TEXT: /(.|\n)*/"


def text_then(rule: str, trigger: str) -> str:
    """A rule matching free text up to and including `trigger`. Lazy: the text ends at the
    first trigger, so a trigger always starts what follows the rule (needs TEXT_TERMINAL)."""
    return f"{rule}[lazy]: TEXT {literal(trigger)}"


def literal(s: str) -> str:
    """A Lark string literal (JSON's escapes)."""
    return json.dumps(s)


def json_value(schema: dict[str, Any]) -> str:
    """`%json {...}`: a value of the schema, compact (as response_format's outputs), its
    objects closed as the json field's are."""
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": {"whitespace_flexible": False}})
