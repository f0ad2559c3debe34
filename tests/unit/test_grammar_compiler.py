"""The grammar compiler's cache and compile timeout (the demo model's tokenizer)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import tokenmill
from tokenmill.structured import GrammarCompiler, StructuredOutputError, StructuredOutputsParams
from tokenmill.tokenizer import Tokenizer

# Big enough to take milliseconds to compile: 40 properties with patterns and bounds.
SCHEMA = {"type": "object", "properties": {
    f"field_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 5 + 1},{i % 7 + 8}}}[0-9]{{2}}$"} if i % 2 else
    {"type": "integer", "minimum": -i * 37, "maximum": i * 991} for i in range(40)}}


@pytest.fixture()
def compiler_args():
    tok = Tokenizer.from_dir(Path(tokenmill.__file__).parent / "demo_model")
    return tok.backend.to_str(), tok.vocab_size, [tok.eos_token_id]


def test_a_slow_compile_is_refused_then_cached_when_done(compiler_args):
    compiler = GrammarCompiler(*compiler_args, compile_timeout_s=1e-4)
    spec = StructuredOutputsParams(json=SCHEMA)
    with pytest.raises(StructuredOutputError, match="did not compile within"):
        compiler.compiled(spec)
    deadline = time.monotonic() + 30
    while True:  # the compile finishes in the background and lands in the cache
        try:
            matcher = compiler.compiled(spec)
            break
        except StructuredOutputError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert compiler.compiled(spec) is matcher  # cached: no compile, no timeout


def test_cache_is_by_content_and_bad_grammars_are_not_cached(compiler_args):
    compiler = GrammarCompiler(*compiler_args)
    a = compiler.compiled(StructuredOutputsParams(json=SCHEMA))
    assert compiler.compiled(StructuredOutputsParams(json=dict(SCHEMA))) is a
    assert compiler.matcher(StructuredOutputsParams(json=SCHEMA)) is not a  # a copy per request
    for _ in range(2):
        with pytest.raises(StructuredOutputError, match="invalid regex"):
            compiler.compiled(StructuredOutputsParams(regex="(unclosed"))
