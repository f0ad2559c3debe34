"""JSON-schema adjustments made before compiling."""

from __future__ import annotations

from typing import Any

# Keywords whose value is one subschema, a list of them, or a map of names to them.
_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that declares properties
    and does not say: the output holds the declared properties only (OpenAI's strict mode;
    vLLM's default backend does the same). Without it a small model fills objects with
    invented keys until max_tokens. An object schema without properties stays any object,
    and a schema that uses allOf is left as it is (its parts add up to one object, and
    closing each part would forbid the others' properties)."""
    return schema if _uses_all_of(schema) else _closed(schema)


def _closed(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(s) for name, s in out[key].items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _uses_all_of(value: Any) -> bool:
    if isinstance(value, dict):
        return "allOf" in value or any(_uses_all_of(v) for v in value.values())
    if isinstance(value, list):
        return any(_uses_all_of(v) for v in value)
    return False
