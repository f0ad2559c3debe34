"""The OpenAPI document at /openapi.json: every route's request body and every response it
can give, built from protocol.py's models.

The handlers take the raw request (they parse it themselves, to answer OpenAI-style 400s),
so FastAPI sees no body models; the table below says what each route reads and returns,
and `document_routes` refuses to build a document with a route the table does not cover.
The document describes the server as configured: the API key's 401s and bearer scheme
appear only when a key is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tokenmill.server.limits import INT64_MAX, INT64_MIN
from tokenmill.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

_ERRORS = {
    400: "Invalid request: malformed JSON, a wrong type or value, a feature not built yet, a "
         "prompt beyond the context, more sequences than the server holds.",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "Request body over --max-request-body-bytes.",
    500: "A bug; the message holds the request id, the log the traceback.",
    503: "Server full (engine_overloaded), shutting down (shutting_down) or engine stopped (engine_dead); "
         "retry after Retry-After seconds.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}, "required": True}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"},
                          "required": True}},
}
_REQUEST_ID = {"X-Request-Id": {"description": "The client's X-Request-Id if it sent a tame one, else a new id.",
                                "schema": {"type": "string"}, "required": True}}
_SSE = ("Server-sent events: one `data: {{{name}}}` per piece of text, an error as one last "
        "`data: {{\"error\": ...}}`, then `data: [DONE]`.")


@dataclass(frozen=True)
class _Operation:
    summary: str
    ok: type[BaseModel] | str | None  # the 200 body's model, a text media type, or no body
    errors: tuple[int, ...]
    request: type[BaseModel] | None = None
    stream_chunk: type[BaseModel] | None = None  # with stream: true, events of this model
    protected: bool = True  # needs the API key when one is set


_GENERATE_ERRORS = (400, 404, 413, 500, 503)
_OPERATIONS: dict[tuple[str, str], _Operation] = {
    ("post", "/v1/completions"): _Operation("Create a completion", CompletionResponse, _GENERATE_ERRORS,
                                            CompletionRequest, CompletionResponse),
    ("post", "/v1/chat/completions"): _Operation("Create a chat completion", ChatCompletionResponse,
                                                 _GENERATE_ERRORS, ChatCompletionRequest, ChatCompletionChunk),
    ("post", "/tokenize"): _Operation("Tokenize a prompt or chat messages (vLLM)", TokenizeResponse,
                                      _GENERATE_ERRORS, TokenizeRequest),
    ("post", "/detokenize"): _Operation("Detokenize token ids (vLLM)", DetokenizeResponse, _GENERATE_ERRORS,
                                        DetokenizeRequest),
    ("get", "/v1/models"): _Operation("List the served models", ModelList, (500,)),
    ("get", "/v1/models/{model_id}"): _Operation("Describe a served model", ModelCard, (404, 500)),
    ("get", "/health"): _Operation("200 while the engine runs; 503 when it stopped or the server drains",
                                   None, (500, 503), protected=False),
    ("get", "/metrics"): _Operation("Prometheus metrics", "text/plain", (500,), protected=False),
    ("get", "/version"): _Operation("Version; the engine settings too with the API key", VersionResponse,
                                    (500,), protected=False),
}


def document_routes(app: FastAPI, has_api_key: bool) -> None:
    """Replace FastAPI's generated document with the complete one (built on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, has_api_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI, has_api_key: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            spec = _OPERATIONS[(method, path)]  # a new route must be documented here
            op["summary"] = spec.summary
            protected = spec.protected and has_api_key
            if spec.request is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(spec.request)}}}
            if protected:
                op["security"] = [{"bearer": []}]
            op["responses"] = _responses(spec, protected)
    requests = [spec.request for spec in _OPERATIONS.values() if spec.request is not None]
    responses = [ErrorResponse] + [m for spec in _OPERATIONS.values() for m in (spec.ok, spec.stream_chunk)
                                   if isinstance(m, type)]
    _, top = models_json_schema([(m, "validation") for m in requests] + [(m, "serialization") for m in responses],
                                ref_template="#/components/schemas/{model}")
    schemas = top["$defs"]
    for model in requests:
        _null_means_default(schemas, model.__name__)
        _bound_integers(schemas[model.__name__])
    doc["components"] = {"schemas": schemas}
    if has_api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _responses(spec: _Operation, protected: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK", "headers": _REQUEST_ID}
    if isinstance(spec.ok, type):
        ok["content"] = {"application/json": {"schema": _ref(spec.ok)}}
    elif isinstance(spec.ok, str):
        ok["content"] = {spec.ok: {"schema": {"type": "string"}}}
    if spec.stream_chunk is not None:
        ok["description"] = "The response; with `stream: true`, " + _SSE.format(name=spec.stream_chunk.__name__)
        # One event (OpenAPI 3.1 reads an event stream's schema per event).
        ok["content"]["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "description": f"{spec.stream_chunk.__name__} or an error "
                                                                     "object, as JSON; or [DONE]"}}}}
    out = {"200": ok}
    for status in sorted(spec.errors + ((401,) if protected else ())):
        out[str(status)] = {"description": _ERRORS[status], "headers": {**_REQUEST_ID, **_HEADERS.get(status, {})},
                            "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return out


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _null_means_default(schemas: dict[str, Any], name: str, seen: set[str] | None = None) -> None:
    """Mark the optional fields of a request model, and of the request models it holds,
    nullable: OpenAIBaseModel reads null as "not sent" (many clients send every field)."""
    seen = seen if seen is not None else set()
    if name in seen:
        return
    seen.add(name)
    schema = schemas[name]
    required = set(schema.get("required", ()))
    for field, prop in schema.get("properties", {}).items():
        for ref in _refs(prop):
            _null_means_default(schemas, ref, seen)
        if field in required or _allows_null(prop):
            continue
        schema["properties"][field] = {"anyOf": [prop, {"type": "null"}],
                                       **{k: prop[k] for k in ("default", "title") if k in prop}}


def _bound_integers(schema: Any) -> None:
    """Every integer a request holds must fit in 64 bits (limits.py refuses the others)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema.setdefault("minimum", INT64_MIN)
            schema.setdefault("maximum", INT64_MAX)
        for value in schema.values():
            _bound_integers(value)
    elif isinstance(schema, list):
        for value in schema:
            _bound_integers(value)


def _allows_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(_allows_null(p) for p in prop.get("anyOf", ()))


def _refs(prop: Any) -> list[str]:
    """Names of the component schemas a property refers to, at any depth."""
    if isinstance(prop, dict):
        own = [prop["$ref"].rsplit("/", 1)[-1]] if "$ref" in prop else []
        return own + [r for v in prop.values() for r in _refs(v)]
    if isinstance(prop, list):
        return [r for v in prop for r in _refs(v)]
    return []
