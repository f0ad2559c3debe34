"""The gateway's settings: one frozen dataclass per concern, read from the command line and
an optional TOML file (`--config`), the command line winning.

A config file, all keys optional:

    admin_key = "sk-admin-..."          # or $TOKENMILL_GATEWAY_ADMIN_KEY
    db = "postgresql://gw@db/gateway"   # default: tokenmill-gateway.db (SQLite)
    redis_url = "redis://cache:6379/0"  # shared limits for several gateways

    [[backends]]
    url = "http://10.0.0.5:8000"
    weight = 2

    [routing]
    policy = "prefix"                   # or least_requests
    load_factor = 1.25

    [models."SmolLM2-135M-Instruct"]
    input_usd_per_1m = 0.05             # prices for $ budgets
    output_usd_per_1m = 0.20
    rpm = 6000                          # limits of the model across all keys
    tpm = 2000000
    max_parallel_requests = 256
    default_max_tokens = 1024           # reserved (and sent) when a request gives none
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from tokenmill.gateway.backends import BackendConfig, HealthConfig
from tokenmill.gateway.routing import RoutingConfig

DEFAULT_MAX_TOKENS = 4096
ADMIN_KEY_ENV = "TOKENMILL_GATEWAY_ADMIN_KEY"


@dataclass(frozen=True)
class ModelPolicy:
    """Prices and model-wide limits of one model name."""

    input_usd_per_1m: float = 0.0
    output_usd_per_1m: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    max_parallel_requests: int | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_1m + completion_tokens * self.output_usd_per_1m) / 1e6


@dataclass(frozen=True)
class RetryConfig:
    num_retries: int = 2  # other replicas tried after the first, before any byte is sent
    backoff_s: float = 0.05  # doubled each retry, with jitter
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class GatewayConfig:
    backends: tuple[BackendConfig, ...]
    models: dict[str, ModelPolicy] = field(default_factory=dict)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    db: str = "tokenmill-gateway.db"  # SQLite path, or a postgresql:// URL
    redis_url: str | None = None  # None: limits in this process
    admin_key: str | None = None  # None: the admin API is off
    require_auth: bool = True  # False: no keys (a plain load balancer; model limits still apply)
    key_cache_ttl_s: float = 2.0  # how stale a key record may be (revocation delay on OTHER gateways)
    affinity_header: str = "x-session-id"
    access_log: bool = True
    max_body_bytes: int = 32 * 2**20

    def policy(self, model: str) -> ModelPolicy:
        return self.models.get(model) or _DEFAULT_POLICY


_DEFAULT_POLICY = ModelPolicy()


def _section(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return cls(**data)


def load_file(path: str | Path) -> dict:
    """The TOML file as keyword arguments of GatewayConfig (clear errors naming the file)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"gateway config {path}: {e}") from e
    out: dict = {}
    try:
        if "backends" in data:
            out["backends"] = tuple(_section(BackendConfig, b, f"{path} [[backends]]") for b in data.pop("backends"))
        if "models" in data:
            out["models"] = {name: _section(ModelPolicy, m, f"{path} [models.{name!r}]")
                             for name, m in data.pop("models").items()}
        for name, cls in (("routing", RoutingConfig), ("health", HealthConfig), ("retry", RetryConfig)):
            if name in data:
                out[name] = _section(cls, data.pop(name), f"{path} [{name}]")
    except (TypeError, ValueError) as e:
        raise ValueError(f"gateway config {path}: {e}") from e
    top = {f.name for f in fields(GatewayConfig)} - {"backends", "models", "routing", "health", "retry"}
    unknown = set(data) - top
    if unknown:
        raise ValueError(f"gateway config {path}: unknown key(s) {', '.join(sorted(unknown))}")
    out.update(data)
    return out


def build_config(**kwargs) -> GatewayConfig:
    """A GatewayConfig from keyword arguments (a file's, with the command line's over them)."""
    kwargs.setdefault("admin_key", os.environ.get(ADMIN_KEY_ENV) or None)
    if not kwargs.get("backends"):
        raise ValueError("the gateway needs at least one backend: --backend URL (or [[backends]] in --config)")
    return GatewayConfig(**kwargs)
