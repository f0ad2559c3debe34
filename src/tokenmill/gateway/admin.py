"""The admin API (LiteLLM's key-management routes and field names), behind the admin key:

    POST /key/generate    {key_alias, duration, models, metadata, rpm_limit, tpm_limit,
                           max_parallel_requests, model_rpm_limit, model_tpm_limit,
                           max_budget, max_budget_tokens, budget_duration}  -> {"key": ...}
    POST /key/update      {key_id, any of the fields above}
    POST /key/regenerate  {key_id, grace_period}   a new secret; the old one works for grace_period
    POST /key/delete      {key_ids: [...]}         revoke (the record stays, for audit)
    GET  /key/list
    GET  /key/info?key_id=...                      with its spend
A key is named by its id or, as in LiteLLM, by the key itself (`key`, `keys`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import fields, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from tokenmill.gateway.asgi import header, parse_json, read_body, send_json
from tokenmill.gateway.keys import (
    KEY_PREFIX,
    KeyLimits,
    KeyRecord,
    create_record,
    parse_duration_s,
    rotated,
    split_key,
)
from tokenmill.gateway.limits import budget_period
from tokenmill.server.errors import APIError

if TYPE_CHECKING:
    from tokenmill.gateway.app import Gateway

_LIMIT_FIELDS = {f.name for f in fields(KeyLimits)}
_OTHER_FIELDS = {"key_alias", "duration", "models", "metadata"}


def _check_admin(gw: Gateway, scope) -> None:
    if not gw.config.admin_key:
        raise APIError(403, "The admin API is off: start the gateway with --admin-key "
                            "(or $TOKENMILL_GATEWAY_ADMIN_KEY).", type="permission_error", code="admin_disabled")
    auth = header(scope, b"authorization") or ""
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    # Digests first, so the comparison takes the same time whatever the lengths.
    if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(),
                               hashlib.sha256(gw.config.admin_key.encode()).digest()):
        raise APIError(401, "The admin API needs the admin key as 'Authorization: Bearer <admin key>'.",
                       code="invalid_api_key")


def _fields(body: dict, allowed: set[str]) -> dict:
    unknown = set(body) - allowed
    if unknown:
        raise APIError(400, f"Unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}.")
    return body


def _limits(body: dict, base: KeyLimits | None = None) -> KeyLimits:
    given = {k: v for k, v in body.items() if k in _LIMIT_FIELDS}
    try:
        return replace(base, **given) if base else KeyLimits(**given)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from e


def _models(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise APIError(400, "'models' must be a list of model names.", param="models")
    return tuple(value)


def _metadata(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(400, "'metadata' must be a JSON object, e.g. {\"team\": \"search\"}.", param="metadata")
    return value


def _expiry_s(value) -> float | None:
    try:
        return parse_duration_s(value)
    except ValueError as e:
        raise APIError(400, str(e), param="duration") from e


async def _record(gw: Gateway, key_or_id) -> KeyRecord:
    """A key by its id or by the key itself (LiteLLM's routes take the key)."""
    given = str(key_or_id or "")
    parts = split_key(given)
    key_id = parts[0] if parts else given
    record = await asyncio.to_thread(gw.store.get, key_id) if key_id else None
    if record is None or (parts and not record.matches(parts[1], time.time())):
        shown = key_id if not parts else f"{KEY_PREFIX}{key_id}-..."
        raise APIError(404, f"No key {shown!r}.", param="key", code="key_not_found")
    return record


def _which(body: dict) -> str:
    return body.get("key_id") or body.get("key")


async def _save(gw: Gateway, record: KeyRecord) -> None:
    await asyncio.to_thread(gw.store.replace, record)
    gw.keys.invalidate(record.key_id)


async def handle(gw: Gateway, scope, receive, send) -> None:
    body_bytes = await read_body(receive, 1 << 20)
    _check_admin(gw, scope)
    route = (scope["method"], scope["path"])
    if route == ("POST", "/key/generate"):
        body = _fields(parse_json(body_bytes) if body_bytes else {}, _LIMIT_FIELDS | _OTHER_FIELDS)
        record, key = create_record(key_alias=str(body.get("key_alias") or ""),
                                    duration_s=_expiry_s(body.get("duration")), models=_models(body.get("models")),
                                    metadata=_metadata(body.get("metadata")), limits=_limits(body))
        await asyncio.to_thread(gw.store.insert, record)
        return await send_json(send, 200, {"key": key, **record.public()})
    if route == ("POST", "/key/update"):
        body = _fields(parse_json(body_bytes), _LIMIT_FIELDS | _OTHER_FIELDS | {"key_id", "key"})
        record = await _record(gw, _which(body))
        changes = {"limits": _limits(body, record.limits)}
        if "models" in body:
            changes["models"] = _models(body["models"])
        if "metadata" in body:
            changes["metadata"] = _metadata(body["metadata"])
        if "key_alias" in body:
            changes["key_alias"] = str(body["key_alias"] or "")
        if "duration" in body:
            d = _expiry_s(body["duration"])
            changes["expires_at"] = time.time() + d if d else None
        record = replace(record, **changes)
        await _save(gw, record)
        return await send_json(send, 200, record.public())
    if route == ("POST", "/key/regenerate"):
        body = _fields(parse_json(body_bytes), {"key_id", "key", "grace_period"})
        record, key = rotated(await _record(gw, _which(body)), _expiry_s(body.get("grace_period")) or 0.0)
        await _save(gw, record)
        return await send_json(send, 200, {"key": key, **record.public()})
    if route == ("POST", "/key/delete"):
        body = _fields(parse_json(body_bytes), {"key_ids", "keys"})
        ids = body.get("key_ids") or body.get("keys")
        if not isinstance(ids, list) or not ids:
            raise APIError(400, "'key_ids' (or LiteLLM's 'keys') must be a non-empty list.", param="key_ids")
        records = [await _record(gw, k) for k in ids]  # all exist, or nothing is revoked
        for record in records:
            await _save(gw, replace(record, revoked_at=record.revoked_at or time.time()))
        return await send_json(send, 200, {"deleted_keys": [r.key_id for r in records]})
    if route == ("GET", "/key/list"):
        records = await asyncio.to_thread(gw.store.list)
        return await send_json(send, 200, {"keys": [r.public() for r in records]})
    if route == ("GET", "/key/info"):
        query = parse_qs(scope.get("query_string", b"").decode())
        record = await _record(gw, (query.get("key_id") or query.get("key") or [None])[0])
        period, _ = budget_period(record.limits.budget_duration, time.time())
        total = await asyncio.to_thread(gw.store.spend, record.key_id, "total")
        current = await asyncio.to_thread(gw.store.spend, record.key_id, period)
        return await send_json(send, 200, {**record.public(), "spend": {
            "total": {"tokens": total[0], "usd": total[1]},
            "period": {"name": period, "tokens": current[0], "usd": current[1]}}})
    raise APIError(404, f"No admin route {route[0]} {route[1]}.", code="not_found")
