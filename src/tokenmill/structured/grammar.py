"""Grammars -> llguidance matchers for one tokenizer.

llguidance over xgrammar, by measurement on this project's 2-core AVX2 machine
(docs/structured_output.md): its per-token work is bounded for every grammar (xgrammar
took 0.3-3 s per mask on some regexes, and longer), it refuses JSON-schema keywords it
cannot enforce instead of dropping them, and it needs no transformers at run time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance

from tokenmill.structured.errors import StructuredOutputError
from tokenmill.structured.params import StructuredOutputsParams

# A grammar that has not compiled in this long is refused (400). llguidance bounds its own
# work by "fuel" (milliseconds for any schema measured), so this is a backstop, not a budget.
COMPILE_TIMEOUT_S = 10.0


class GrammarCompiler:
    """Compiles the constraints of requests into matchers, one per request.

    Compiled grammars are kept by content in a bounded LRU: a repeated schema costs a copy
    of a pristine matcher (tens of microseconds) instead of a compile (milliseconds). Safe
    to call from several threads.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256,
                 compile_timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        """Args:
        tokenizer_json: the model's tokenizer.json text (`tokenizers.Tokenizer.to_str()`).
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
        eos_token_ids: the tokens that end a sequence; the grammar allows them once complete.
        compile_timeout_s: a compile that takes longer is a StructuredOutputError; it goes
            on in the background and is cached when done.
        """
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._compile_timeout_s = compile_timeout_s
        self._compiling: dict[tuple[str, str], Future[llguidance.LLMatcher]] = {}  # one compile per content
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")
        # Reentrant: a compile that is already done runs its done-callback (which takes the
        # lock) at once, in the thread that registers it, which holds the lock.
        self._lock = threading.RLock()

    def matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for one request, or StructuredOutputError naming the problem."""
        return self.compiled(spec).deep_copy()

    def compiled(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The cached pristine matcher of `spec` (compiled on first use). Never advance it:
        copy it (`matcher`, or its deep_copy()) for each request."""
        key = spec.grammar_source
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
                return pristine
            future = self._compiling.get(key)
            if future is None:
                future = self._compiling[key] = self._pool.submit(self._compile, *key)
                future.add_done_callback(lambda f: self._store(key, f))
        busy = StructuredOutputError(f"the grammar compiler was busy for {self._compile_timeout_s:g} s with other "
                                     "constraints; retry.")
        try:
            return future.result(timeout=self._compile_timeout_s)
        except FutureCancelled:  # another request waiting on the same compile gave up on it first
            raise busy from None
        except FutureTimeout:
            if future.cancel():  # still queued behind other compiles: it was never tried
                raise busy from None
            raise StructuredOutputError(f"the constraint did not compile within {self._compile_timeout_s:g} s; "
                                        "simplify it.") from None

    def _store(self, key: tuple[str, str], future: Future[llguidance.LLMatcher]) -> None:
        with self._lock:
            del self._compiling[key]
            if not future.cancelled() and future.exception() is None:
                self._cache[key] = future.result()
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)

    def _compile(self, kind: str, text: str) -> llguidance.LLMatcher:
        try:
            if kind == "json_schema":  # compact JSON, as OpenAI's and vLLM's outputs are
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
            else:
                grammar = llguidance.grammar_from(kind, text)
        except ValueError as e:
            raise StructuredOutputError(f"invalid {_WHAT[kind]}: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise StructuredOutputError(f"invalid {_WHAT[kind]}: {' '.join(error.split())[:500]}")
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {_WHAT[kind]}: {matcher.get_error()}")
        return matcher


_WHAT = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
