"""llguidance vs xgrammar on this machine, for the default model's tokenizer: the
measurements behind tokenmill's choice of grammar library (docs/structured_output.md,
"Why llguidance").

    pip install --no-deps xgrammar apache-tvm-ffi   # xgrammar's own deps would pull ~1 GB of triton
    python scripts/compare_grammar_libs.py [--repeats 5]

tokenmill does not depend on xgrammar; this script is the only thing that imports it.
Prints, per library: tokenizer setup, first compile of several constraints, one mask for
1 and for 64 requests (each a few tokens into its output), a pathological regex's mask,
and what each does with a schema keyword it cannot enforce. Medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import llguidance
import torch

from tokenmill.model.default_model import default_model_path
from tokenmill.tokenizer import Tokenizer

SMALL = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"]}
LARGE = {"type": "object", "properties": {
    f"field_{i}": {"type": "string", "maxLength": 30} if i % 3 else {"type": "number", "minimum": 0, "maximum": 100}
    for i in range(24)}, "required": [f"field_{i}" for i in range(24)]}
CONSTRAINTS = [("small schema", "json", SMALL), ("24-property schema", "json", LARGE),
               ("any JSON object", "json", {"type": "object"}), ("regex", "regex", r"[A-Z]{2}-[0-9]{4}"),
               ("choice of 3", "choice", ["yes", "no", "maybe"]), ("GBNF", "gbnf", 'root ::= "(" [0-9]+ ")"')]
PATHOLOGICAL = r"(\w+\s?){1,10}"


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: list[int]) -> None:
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec))
        else:
            grammar = llguidance.grammar_from({"gbnf": "grammar"}.get(kind, kind),
                                              json.dumps(spec) if kind == "choice" else spec)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return llguidance.LLMatcher(self.tok, grammar, log_level=0)

    def matchers(self, compiled: Any, n: int, prefix: list[int]) -> list[Any]:
        out = [compiled.deep_copy() for _ in range(n)]
        for m in out:
            m.consume_tokens(prefix)
        return out

    def masks(self, matchers: list[Any]) -> None:
        for m in matchers:
            m.compute_bitmask()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int, eos: list[int]) -> None:
        import tokenizers
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)  # vLLM's path
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab = vocab

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec))
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind == "choice":  # as vLLM does: an EBNF alternation
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        return self.compiler.compile_grammar(spec)

    def matchers(self, compiled: Any, n: int, prefix: list[int]) -> list[Any]:
        out = [self.xgr.GrammarMatcher(compiled) for _ in range(n)]
        for m in out:
            for t in prefix:
                m.accept_token(t)
        self.bitmask = self.xgr.allocate_token_bitmask(n, self.vocab)
        return out

    def masks(self, matchers: list[Any]) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(self.bitmask, i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = Tokenizer.load(default_model_path())
    tokenizer_json, vocab, eos = tokenizer.backend.to_str(), 49152, sorted(tokenizer.eos_token_ids)
    prefix = tokenizer.encode('{"name":"Ann', add_special_tokens=False)
    for cls in (LLGuidance, XGrammar):
        start = time.perf_counter()
        try:
            lib = cls(tokenizer_json, vocab, eos)
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
            continue
        print(f"== {lib.name}: setup {time.perf_counter() - start:.2f} s (the tokenizer; xgrammar's import too)")
        for label, kind, spec in CONSTRAINTS:
            print(f"  compile {label}: {median_s(partial(lib.compile, kind, spec), args.repeats) * 1e3:.2f} ms")
        compiled = lib.compile("json", SMALL)
        for n in (1, 64):
            matchers = lib.matchers(compiled, n, prefix)
            print(f"  masks of {n} request(s): {median_s(partial(lib.masks, matchers), args.repeats) * 1e3:.3f} ms")
        slow = lib.matchers(lib.compile("regex", PATHOLOGICAL), 1, tokenizer.encode("ab cd", add_special_tokens=False))
        print(f"  one mask of regex {PATHOLOGICAL}: {median_s(partial(lib.masks, slow), 1) * 1e3:.1f} ms")
        try:
            lib.compile("json", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
            print("  uniqueItems: compiled (not enforced)")
        except Exception as e:  # noqa: BLE001 - each library raises its own type
            print(f"  uniqueItems: refused ({' '.join(str(e).split())[:80]})")


if __name__ == "__main__":
    main()
