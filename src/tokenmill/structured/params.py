"""What a request's output must match: vLLM's `structured_outputs` request field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tokenmill.structured.errors import StructuredOutputError
from tokenmill.structured.schema import closed_objects
from tokenmill.structured.structural_tag import structural_tag_grammar


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of these constrains the output (vLLM's names and meanings).

    json: a JSON schema (a dict or its text); regex: a regular expression the whole output
    matches; choice: the output is one of these strings; grammar: a GBNF grammar (llama.cpp's
    EBNF dialect) or a llguidance Lark grammar; structural_tag: free text in which triggers
    start tagged JSON structures (structural_tag.py); json_object: any JSON object (OpenAI's
    `response_format: {"type": "json_object"}`).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | dict[str, Any] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise StructuredOutputError("structured_outputs needs exactly one of json, regex, choice, grammar, "
                                        f"structural_tag, json_object; got {', '.join(given) or 'none'}.")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise StructuredOutputError("structured_outputs.choice must be a non-empty list of strings.",
                                        "structured_outputs.choice")
        for name in ("regex", "grammar"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise StructuredOutputError(f"structured_outputs.{name} must be a string.", f"structured_outputs.{name}")
        for name in ("json", "structural_tag"):
            if not isinstance(getattr(self, name), (str, dict, type(None))):
                raise StructuredOutputError(f"structured_outputs.{name} must be an object or its JSON text.",
                                            f"structured_outputs.{name}")

    @cached_property  # read by every lookup of the compiled grammar (a check, then the request's)
    def grammar_source(self) -> tuple[str, str]:
        """(llguidance grammar format, text): the cache key of the compiled grammar."""
        if self.json_object:
            return "json_schema", '{"type": "object"}'
        if self.json is not None:
            # Key order kept: the output's properties follow the schema's order.
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError:  # the compiler reports it
                    return "json_schema", self.json
            return "json_schema", json.dumps(closed_objects(schema))
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.structural_tag is not None:
            return "grammar", structural_tag_grammar(self.structural_tag)
        return "grammar", self.grammar  # type: ignore[return-value]
