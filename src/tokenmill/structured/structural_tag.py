"""vLLM's `structural_tag`: free text in which each trigger starts a tagged structure.

    {"type": "structural_tag",
     "structures": [{"begin": "<function=get_weather>", "schema": {...}, "end": "</function>"}],
     "triggers": ["<function="]}

The output is any text until a trigger; the trigger must go on into the `begin` of one of
the structures it starts, then a JSON value of that structure's schema, then its `end`;
then free text again, with more structures.
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.structured.errors import StructuredOutputError
from tokenmill.structured.lark import TEXT_TERMINAL, json_value, literal, text_then

_PARAM = "structured_outputs.structural_tag"


def structural_tag_grammar(tag: str | dict[str, Any]) -> str:
    """The Lark grammar of a structural tag (its JSON text or object); StructuredOutputError
    naming what is malformed."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"structural_tag is not valid JSON: {e}", _PARAM) from None
    if not isinstance(tag, dict) or tag.get("type", "structural_tag") != "structural_tag":
        raise StructuredOutputError('structural_tag must be {"type": "structural_tag", "structures": [...], '
                                    '"triggers": [...]}.', _PARAM)
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise StructuredOutputError("structural_tag.triggers must be a non-empty list of strings.", _PARAM)
    if not isinstance(structures, list) or not structures:
        raise StructuredOutputError("structural_tag.structures must be a non-empty list.", _PARAM)
    by_trigger: dict[str, list[str]] = {t: [] for t in triggers}
    rules = []
    for i, s in enumerate(structures):
        if not (isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                and isinstance(s.get("schema"), dict)):
            raise StructuredOutputError(f"structural_tag.structures[{i}] must have a begin and end string and "
                                        "a schema object.", _PARAM)
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise StructuredOutputError(f"structural_tag.structures[{i}].begin {s['begin']!r} starts with none "
                                        "of the triggers.", _PARAM)
        by_trigger[trigger].append(f"structure_{i}")
        rules.append(f"structure_{i}: {literal(s['begin'][len(trigger):])} {json_value(s['schema'])} "
                     f"{literal(s['end'])}")
    used = [(t, names) for t, names in by_trigger.items() if names]
    segments = " | ".join(f"text_then_trigger_{j} ({' | '.join(names)})" for j, (_, names) in enumerate(used))
    lines = ["%llguidance {}", f"start: ({segments})* TEXT", TEXT_TERMINAL]
    lines += [text_then(f"text_then_trigger_{j}", t) for j, (t, _) in enumerate(used)]
    return "\n".join(lines + rules) + "\n"
