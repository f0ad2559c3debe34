"""The metered path of one request: POST /v1/completions and /v1/chat/completions
(key -> model -> worst case -> limits and budget, atomically -> replica -> relay -> settle the
real usage -> metrics and one access-log line), and the pass-through of other /v1 routes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from tokenmill.gateway.accounting import Estimate, Usage, estimate, routing_key, upstream_body
from tokenmill.gateway.asgi import header, parse_json, send_error
from tokenmill.gateway.keys import KeyRecord
from tokenmill.gateway.limits import Reservation
from tokenmill.gateway.metering import rate_limit_error, rate_limit_headers, reservation_for
from tokenmill.gateway.proxy import Call, upstream_headers
from tokenmill.server.errors import APIError

if TYPE_CHECKING:
    from tokenmill.gateway.app import Gateway

logger = logging.getLogger("tokenmill.gateway")
access_logger = logging.getLogger("tokenmill.gateway.access")

STATUS_CLIENT_CLOSED = 499  # nginx's code for "the client went away first"


async def completion(gw: Gateway, scope, body_bytes: bytes, send, request_id: str, *, chat: bool) -> None:
    """POST /v1/completions or /v1/chat/completions, metered."""
    t0 = time.perf_counter()
    key: KeyRecord | None = None
    model: str | None = None
    call: Call | None = None
    res: Reservation | None = None
    est: Estimate | None = None
    status, limited = 0, None
    try:
        key = await gw.authenticate(scope)
        body = parse_json(body_bytes)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required.", param="model")
        if key is not None and not key.allows_model(model):
            raise APIError(403, f"This API key may not use the model '{model}'.", param="model",
                           code="model_not_allowed")
        if not gw.pool.serves(model):
            raise APIError(404, f"The model '{model}' does not exist or no backend serves it.",
                           param="model", code="model_not_found")
        policy = gw.config.policy(model)
        est = estimate(body, chat, policy.default_max_tokens)
        stream = body.get("stream") is True
        payload, drop_usage = upstream_body(body, body_bytes, est, stream)
        res = reservation_for(gw.new_reservation_id(), key, model, policy, est, time.time())
        decision = await gw.state(gw.limiter.admit(res)) if res.scopes or res.budget else None
        if decision is not None and not decision.admitted:
            limited = decision.limit
            res = None
            raise rate_limit_error(decision, model)
        client_headers = rate_limit_headers(decision)
        route_key = routing_key(body, chat, header(scope, gw.config.affinity_header.encode()))
        call = Call(request_id, scope["path"], payload, model, stream, route_key,
                    upstream_headers(scope, request_id), client_headers, drop_usage, t0=t0)
        await gw.forwarder.forward(call, send)
        status = call.status
    except APIError as e:
        status = e.status
        if call is None or call.first_sent_at is None:
            await send_error(send, e)
    except asyncio.CancelledError:
        status = STATUS_CLIENT_CLOSED
    finally:
        usage = usage_to_charge(call, est, status)
        # Metrics label only models a replica serves: made-up names must not grow the series.
        served = model if model and gw.pool.serves(model) else ""
        record(gw, request_id, key, served, call, status, limited, usage, t0)
        if res is not None:
            # Shielded: a settlement must happen even when the client left mid-request.
            await asyncio.shield(_settle(gw, res, key, model, usage))

def usage_to_charge(call: Call | None, est: Estimate | None, status: int) -> Usage:
    """What to charge: the replica's `usage`; after a disconnect mid-stream, the prompt's
    estimate and the chunks streamed; the worst case for a 200 without `usage`; nothing
    when nothing reached the client."""
    if call is None or call.first_sent_at is None or est is None:
        return Usage(0, 0)
    if call.usage is not None:
        return call.usage
    if call.streamed_chunks:
        return Usage(est.prompt_tokens, call.streamed_chunks)
    return Usage(est.prompt_tokens, est.completion_tokens) if status == 200 else Usage(0, 0)

async def _settle(gw: Gateway, res: Reservation, key: KeyRecord | None, model: str, usage: Usage) -> None:
    usd = gw.config.policy(model).cost_usd(usage.prompt_tokens, usage.completion_tokens)
    if key is not None:
        gw.ledger.add(key.key_id, usage.total, usd)  # first: spend is never lost
    state = None
    if res.scopes or res.budget:
        try:
            state = await gw.limiter.settle(res, usage.total, usd)
        except Exception as e:  # noqa: BLE001 - its slot and reservation expire with their lease
            logger.error("could not settle request %s in the limiter: %s", res.request_id, e)
    if key is None:
        return
    if state is not None:
        if state.remaining_usd is not None:
            gw.metrics.remaining_usd.labels(key.label).set(state.remaining_usd)
        if state.remaining_tokens is not None:
            gw.metrics.remaining_tokens.labels(key.label).set(state.remaining_tokens)
    if usd:
        gw.metrics.spend.labels(key.label, model).inc(usd)

def record(gw: Gateway, request_id, key, model, call, status, limited, usage: Usage, t0) -> None:
    label, backend, model = key.label if key else "", call.backend if call else "", model or ""
    m = gw.metrics
    m.child(m.requests, label, model, backend, str(status)).inc()
    if limited:
        m.child(m.limited, label, model, limited).inc()
    if usage.total:
        m.child(m.tokens, label, model, "prompt").inc(usage.prompt_tokens)
        m.child(m.tokens, label, model, "completion").inc(usage.completion_tokens)
    total_s = time.perf_counter() - t0
    added = call.added_s if call else None
    if added is not None:
        m.added_latency.observe(added)
    m.child(m.request_latency, model).observe(total_s)
    if gw.config.access_log:
        access_logger.info(json.dumps({
            "ts": round(time.time(), 3), "request_id": request_id, "key": label, "model": model or None,
            "backend": backend, "status": status, "stream": bool(call and call.stream),
            "latency_ms": round(total_s * 1e3, 2),
            "added_ms": None if added is None else round(added * 1e3, 3),
            "retries": call.retries if call else 0, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "limited": limited,
            "error": call.error if call and call.error else None}))



async def passthrough(gw: Gateway, scope, body: bytes, send, request_id: str) -> None:
    """Any other POST /v1 route (embeddings, tokenize, ...): the key and its allowed models
    checked, the body forwarded as it came to the least-loaded replica serving its model."""
    status, key, call, model = 0, None, None, None
    t0 = time.perf_counter()
    try:
        if scope["method"] != "POST":
            raise APIError(405, f"The gateway passes through POST requests only ({scope['method']} {scope['path']}).")
        key = await gw.authenticate(scope)
        try:
            model = json.loads(body).get("model") if body else None
        except (ValueError, AttributeError):
            model = None
        if key is not None and isinstance(model, str) and not key.allows_model(model):
            raise APIError(403, f"This API key may not use the model '{model}'.", param="model",
                           code="model_not_allowed")
        path = scope["path"] + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
        call = Call(request_id, path, body, model if isinstance(model, str) else None, False, "",
                    upstream_headers(scope, request_id), {}, t0=t0)
        await gw.forwarder.forward(call, send)
        status = call.status
    except APIError as e:
        status = e.status
        await send_error(send, e)
    except asyncio.CancelledError:
        status = STATUS_CLIENT_CLOSED
    finally:
        served = model if isinstance(model, str) and gw.pool.serves(model) else ""
        record(gw, request_id, key, served, call, status, None, Usage(0, 0), t0)


