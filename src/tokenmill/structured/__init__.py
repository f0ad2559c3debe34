"""Structured output: decoding constrained by a grammar, so the output is valid by
construction (docs/structured_output.md).

params.py   what a request asks for (vLLM's `structured_outputs`: json, regex, choice,
            grammar, structural_tag, json_object); errors.py its error
schema.py   JSON-schema adjustments (closed objects)
lark.py, structural_tag.py   the Lark grammars tokenmill writes
grammar.py  those -> llguidance matchers for one tokenizer, compiled once per content
mask.py     a step's token masks applied to the constrained rows of the logits
"""

from tokenmill.structured.errors import StructuredOutputError
from tokenmill.structured.grammar import GrammarCompiler
from tokenmill.structured.params import StructuredOutputsParams

__all__ = ["GrammarCompiler", "StructuredOutputError", "StructuredOutputsParams"]
