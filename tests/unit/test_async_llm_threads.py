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


def test_async_llm_builds_the_engine_off_the_calling_thread(monkeypatch):
    """The point of the helper: the model (and its OpenMP pool) never loads on the thread
    that creates AsyncLLM (the server's main thread)."""
    from tokenmill.config import DEMO_MODEL_DIR, create_engine_config
    from tokenmill.engine import async_llm
    from tokenmill.engine.core import EngineCore

    built_on = []

    class RecordingCore(EngineCore):
        def __init__(self, config):
            built_on.append(threading.get_ident())
            super().__init__(config)

    monkeypatch.setattr(async_llm, "EngineCore", RecordingCore)
    async_llm.AsyncLLM(create_engine_config(DEMO_MODEL_DIR))
    assert built_on and built_on[0] != threading.get_ident()
