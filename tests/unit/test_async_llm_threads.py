"""AsyncLLM loads the model on a thread that then exits (see _call_in_fresh_thread)."""

from __future__ import annotations

import threading

import pytest

from tokenmill.engine.async_llm import _call_in_fresh_thread


def test_runs_elsewhere_and_returns_the_result():
    caller = threading.get_ident()
    ident, value = _call_in_fresh_thread(lambda x: (threading.get_ident(), x * 2), 21)
    assert value == 42
    assert ident != caller


def test_reraises_the_error_in_the_caller():
    def load():
        raise ValueError("model.safetensors: checkpoint is missing tensors")

    with pytest.raises(ValueError, match="missing tensors"):
        _call_in_fresh_thread(load)
