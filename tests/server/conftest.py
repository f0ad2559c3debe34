"""Fixtures of the server tests; the helpers are in server_harness.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_model(checkpoint_factory):
    """The tiny random Llama checkpoint (vocab 320, 256 positions), built once per session."""
    return checkpoint_factory("llama")
