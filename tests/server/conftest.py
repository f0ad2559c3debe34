"""Fixtures of the server tests; the helpers are in server_harness.py."""

from __future__ import annotations

import openai
import pytest
from server_harness import running_server


@pytest.fixture(scope="module")
def tiny_model(checkpoint_factory):
    """The tiny random Llama checkpoint (vocab 320, 256 positions), built once per session."""
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def server(tiny_model):
    """A real server on the tiny model, one per test module; a module may override it."""
    with running_server(tiny_model) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    """An httpx client of this module's `server`."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    """The official openai client of this module's `server`."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

