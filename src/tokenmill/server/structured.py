"""The request fields that constrain the output: OpenAI's `response_format` (json_object,
json_schema), vLLM's `structured_outputs` and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`, read into StructuredOutputsParams; and OpenAI's `tools`,
`tool_choice` and `parallel_tool_calls`, read into a ToolsRequest."""

from __future__ import annotations

from typing import Any

from tokenmill.server.errors import bad_request
from tokenmill.structured import StructuredOutputError, StructuredOutputsParams
from tokenmill.tools import ToolsRequest
from tokenmill.tools.spec import FUNCTION_NAME

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_FIELDS = ("json", "regex", "choice", "grammar", "structural_tag", "json_object")
_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
# The request fields read here (from the request model's extra fields).
STRUCTURED_FIELDS = frozenset({"response_format", "structured_outputs", *_GUIDED, *_TOOL_FIELDS})


_SCHEMA = {"type": "object"}
_SCHEMA_OR_TEXT = {"type": ["object", "string"]}
_CHOICES = {"type": "array", "items": {"type": "string"}, "minItems": 1}
# How /openapi.json documents the fields read here (they stay extra fields of the request
# models: the readers above check them and answer with OpenAI-style 400s).
STRUCTURED_FIELD_SCHEMAS: dict[str, Any] = {
    "response_format": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": _SCHEMA,
                                                         "strict": {"type": "boolean"}}}}},
    "structured_outputs": {"type": "object", "properties": {
        "json": _SCHEMA_OR_TEXT, "regex": {"type": "string"}, "choice": _CHOICES, "grammar": {"type": "string"},
        "structural_tag": _SCHEMA_OR_TEXT, "json_object": {"type": "boolean"}}},
    "guided_json": _SCHEMA_OR_TEXT, "guided_regex": {"type": "string"}, "guided_choice": _CHOICES,
    "guided_grammar": {"type": "string"},
}
_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": f"^{FUNCTION_NAME.pattern}$"}, "description": {"type": "string"},
    "parameters": _SCHEMA, "strict": {"type": "boolean"}}}
TOOL_FIELD_SCHEMAS: dict[str, Any] = {
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": _FUNCTION}}},
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]},
    "parallel_tool_calls": {"type": "boolean"},
}


def document_fields(fields: dict[str, Any]) -> Any:
    """A pydantic json_schema_extra that adds `fields` to a request model's properties."""
    def add(schema: dict[str, Any], _cls: Any) -> None:
        schema.setdefault("properties", {}).update(fields)
    return add


def tools_from(extra: dict[str, Any]) -> ToolsRequest | None:
    """The request's tools, None when no tool may be called; 400 naming the field."""
    try:
        return ToolsRequest.parse(*(extra.get(name) for name in _TOOL_FIELDS))
    except StructuredOutputError as e:
        raise bad_request(str(e), param=e.param) from None


def structured_outputs_from(extra: dict[str, Any]) -> StructuredOutputsParams | None:
    """The request's constraint, None without one; 400 naming the field when malformed or
    when two fields ask for different ones."""
    asked: list[tuple[str, dict[str, Any]]] = []
    fmt = extra.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        asked.append(("response_format", _from_response_format(fmt)))
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("structured_outputs must be an object.", param="structured_outputs")
        fields = {k: v for k, v in so.items() if k in _FIELDS and v is not None and v is not False}
        unknown = sorted(set(so) - set(_FIELDS) - {"disable_any_whitespace", "disable_fallback", "whitespace_pattern"})
        if unknown:
            raise bad_request(f"structured_outputs.{unknown[0]} is not supported (json, regex, choice, grammar, "
                              "structural_tag and json_object are).", param=f"structured_outputs.{unknown[0]}")
        asked.append(("structured_outputs", fields))
    for name, field in _GUIDED.items():
        if extra.get(name) is not None:
            asked.append((name, {field: extra[name]}))
    if not asked:
        return None
    if len(asked) > 1:
        names = " and ".join(name for name, _ in asked)
        raise bad_request(f"{names} each ask for structured output; send one.", param=asked[1][0])
    name, fields = asked[0]
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:  # reported against the field the client sent
        raise bad_request(str(e), param=name) from None


def _from_response_format(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema'.",
                          param="response_format.type")
    if fmt["type"] == "json_object":
        return {"json_object": True}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad_request("response_format.json_schema must be an object with a 'schema' object.",
                          param="response_format.json_schema")
    # OpenAI's `strict` asks for exactly the schema; the grammar always enforces it.
    return {"json": spec.get("schema") or {"type": "object"}}
