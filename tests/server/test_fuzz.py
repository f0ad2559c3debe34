"""Property-based fuzzing of every route from the server's own /openapi.json (schemathesis,
with the project's settings in schemathesis.toml): no input gets a 5xx, every 4xx has an
OpenAI error body, and every response conforms to the document (status, content type,
headers, body schema); invalid requests are refused, and the API key is enforced.

The example count is bounded so the whole module takes well under a minute; the longer
CLI run is in docs/server.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from server_harness import CEILING_S, MODEL_NAME, running_server

from tokenmill.server.args import ServerSettings
from tokenmill.server.openapi import build_document

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES_PER_ROUTE = 25


@pytest.fixture(scope="module")
def server(tiny_model):
    # A small capacity and context keep the generations the fuzzer asks for short (n past 8
    # is a 400, and so is max_tokens past the context).
    settings = ServerSettings(served_model_names=(MODEL_NAME,), api_key=KEY, max_waiting_requests=4)
    with running_server(tiny_model, settings, max_num_seqs=4, max_model_len=64) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    config = schemathesis.Config.from_path(Path(__file__).with_name("schemathesis.toml"))
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)


OPERATIONS = [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("GET", "/health"), ("GET", "/metrics"),
    ("GET", "/version"),
]


# Invalid inputs exist only where a route reads a body.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_every_route_answers_any_input_as_documented(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def check(case):
        response = case.call_and_validate(headers=AUTH, timeout=CEILING_S)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["type"] == "invalid_request_error"

    check()


def test_every_route_is_documented_with_its_bodies_and_errors(server):
    with server.client() as c:
        doc = c.get("/openapi.json").json()
    operations = {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(operations) == {(m.lower(), p) for m, p in OPERATIONS}
    for (method, _), op in operations.items():
        assert "200" in op["responses"] and "500" in op["responses"]
        if method == "post":
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert {"400", "401", "404", "413", "503"} <= set(op["responses"])
            assert op["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert completion["required"] == ["prompt"] and "stream" in completion["properties"]
    assert set(operations[("post", "/v1/completions")]["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"}


def test_without_a_key_the_document_has_no_401_and_no_security(server):
    doc = build_document(server.server.config.app, has_api_key=False)
    for item in doc["paths"].values():
        for op in item.values():
            assert "401" not in op["responses"] and "security" not in op
    assert "securitySchemes" not in doc["components"]
