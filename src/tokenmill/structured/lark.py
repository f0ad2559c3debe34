"""Pieces of the llguidance Lark grammars tokenmill writes (tool calls, structural tags)."""

from __future__ import annotations

import json
from typing import Any

from tokenmill.structured.schema import closed_objects

# Any text, newlines included; as a lazy rule's first part, it ends at the first trigger.
TEXT_TERMINAL = r"TEXT: /(.|\n)*/"


def literal(s: str) -> str:
    """A Lark string literal (JSON's escapes)."""
    return json.dumps(s)


def json_value(schema: dict[str, Any]) -> str:
    """`%json {...}`: a value of the schema, compact (as response_format's outputs), its
    objects closed as the json field's are."""
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": {"whitespace_flexible": False}})
