"""API keys: how they look, how they are stored (salted hashes only) and checked.

A key is `sk-tm-<key_id>-<secret>`: the id (12 hex digits) finds the record, the secret is
checked against HMAC-SHA256(salt, secret) with a constant-time comparison. Keys are random
256-bit secrets, so a fast keyed hash is the right tool (a password hash like scrypt would
add milliseconds to every request for no gain in what an attacker can guess).

Rotation keeps the key id (its limits, budget and spend stay with it) and replaces the
secret; the previous secret keeps working until `previous_expires_at` (the grace period).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

KEY_PREFIX = "sk-tm-"
_KEY_RE = re.compile(r"^sk-tm-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})$")
BUDGET_PERIODS = ("daily", "monthly", "total")


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    m = _KEY_RE.match(key)
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True)
class KeyLimits:
    """What one key may use. None = no limit of that kind.

    Names follow LiteLLM's key fields, so its users' key definitions carry over."""

    rpm_limit: int | None = None  # requests per minute (sliding 60 s window)
    tpm_limit: int | None = None  # prompt + completion tokens per minute
    max_parallel_requests: int | None = None
    model_rpm_limit: dict[str, int] = field(default_factory=dict)  # per model, for this key
    model_tpm_limit: dict[str, int] = field(default_factory=dict)
    max_budget: float | None = None  # US dollars per budget period
    max_budget_tokens: int | None = None  # tokens per budget period
    budget_duration: str = "total"  # daily | monthly (calendar, UTC) | total; 1d and 1mo accepted

    def __post_init__(self) -> None:
        # LiteLLM's spellings of a day and a month (here: calendar periods in UTC).
        alias = {"1d": "daily", "1mo": "monthly"}.get(self.budget_duration)
        if alias:
            object.__setattr__(self, "budget_duration", alias)
        if self.budget_duration not in BUDGET_PERIODS:
            raise ValueError(f"budget_duration must be one of {', '.join(BUDGET_PERIODS)} (or 1d, 1mo), "
                             f"not {self.budget_duration!r}")
        for name in ("rpm_limit", "tpm_limit", "max_parallel_requests", "max_budget_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if self.max_budget is not None and self.max_budget < 0:
            raise ValueError(f"max_budget must be >= 0, not {self.max_budget!r}")
        for name in ("model_rpm_limit", "model_tpm_limit"):
            for model, value in getattr(self, name).items():
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name}[{model!r}] must be a whole number >= 0, not {value!r}")


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: never the secret itself."""

    key_id: str
    salt: str  # hex
    secret_hash: str  # hex HMAC-SHA256(salt, secret)
    created_at: float  # unix seconds
    key_alias: str = ""
    expires_at: float | None = None
    revoked_at: float | None = None
    models: tuple[str, ...] = ()  # allowed models; empty = all
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. team, user
    limits: KeyLimits = field(default_factory=KeyLimits)
    previous_salt: str | None = None  # the secret before the last rotation ...
    previous_hash: str | None = None
    previous_expires_at: float | None = None  # ... valid until then

    @property
    def label(self) -> str:
        """The name metrics and logs use: the alias if set (readable), else the id."""
        return self.key_alias or self.key_id

    def matches(self, secret: str, now: float) -> bool:
        """Constant-time check of a secret against the current (and grace-period) hash."""
        ok = hmac.compare_digest(hash_secret(self.salt, secret), self.secret_hash)
        if self.previous_hash and self.previous_salt:
            old = hmac.compare_digest(hash_secret(self.previous_salt, secret), self.previous_hash)
            ok |= old and (self.previous_expires_at or 0) > now
        return ok

    def problem(self, now: float) -> str | None:
        """Why the key cannot be used now, or None."""
        if self.revoked_at is not None:
            return "has been revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "has expired"
        return None

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but salts and hashes."""
        d = asdict(self)
        for k in ("salt", "secret_hash", "previous_salt", "previous_hash"):
            d.pop(k)
        d["models"] = list(self.models)
        d.update(d.pop("limits"))
        return d


def create_record(*, key_alias: str = "", duration_s: float | None = None, models=(),
                  metadata: dict | None = None, limits: KeyLimits | None = None) -> tuple[KeyRecord, str]:
    """A new key: (record to store, the key to hand out once)."""
    key_id, secret, salt = secrets.token_hex(6), new_secret(), secrets.token_hex(16)
    now = time.time()
    record = KeyRecord(key_id=key_id, salt=salt, secret_hash=hash_secret(salt, secret), created_at=now,
                       key_alias=key_alias, expires_at=now + duration_s if duration_s else None,
                       models=tuple(models), metadata=dict(metadata or {}), limits=limits or KeyLimits())
    return record, f"{KEY_PREFIX}{key_id}-{secret}"


def rotated(record: KeyRecord, grace_s: float) -> tuple[KeyRecord, str]:
    """The record with a new secret; the old one stays valid for `grace_s` seconds."""
    secret, salt = new_secret(), secrets.token_hex(16)
    new = replace(record, salt=salt, secret_hash=hash_secret(salt, secret),
                  previous_salt=record.salt if grace_s > 0 else None,
                  previous_hash=record.secret_hash if grace_s > 0 else None,
                  previous_expires_at=time.time() + grace_s if grace_s > 0 else None)
    return new, f"{KEY_PREFIX}{record.key_id}-{secret}"


_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration_s(text: str | float | int | None) -> float | None:
    """'30d', '12h', '90m', '45s' or a number of seconds (LiteLLM's `duration` strings)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise ValueError(f"cannot read {text!r} as a duration; use e.g. 30d, 12h, 90m or 45s")
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
