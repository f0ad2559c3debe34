"""`tokenmill gateway serve | keys ...`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from tokenmill.gateway.config import ADMIN_KEY_ENV

_KEY_FIELDS_HELP = ("Limits: --rpm, --tpm, --max-parallel, --max-budget (USD), --max-budget-tokens, "
                    "--budget-duration daily|monthly|total.")


def add_gateway_parser(sub) -> None:
    gw = sub.add_parser("gateway", help="API gateway in front of OpenAI-compatible servers: keys, limits, "
                                        "budgets, cache-aware routing, failover.",
                        description="tokenmill's gateway (docs/gateway.md): one endpoint in front of several "
                                    "OpenAI-compatible servers (tokenmill, vLLM, llama.cpp, SGLang).")
    gsub = gw.add_subparsers(dest="gateway_cmd", required=True)

    serve = gsub.add_parser("serve", help="Run the gateway.",
                            description="Run the gateway. Every flag can also come from --config FILE (TOML; see "
                                        "docs/gateway.md); flags win.")
    serve.add_argument("--backend", action="append", default=None, metavar="URL[=WEIGHT]",
                       help="An upstream server (repeat for several), e.g. http://10.0.0.5:8000=2.")
    serve.add_argument("--config", default=None, metavar="TOML", help="Gateway config file (backends, model "
                       "prices and limits, routing, health).")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on. (default: %(default)s)")
    serve.add_argument("--port", type=int, default=4000, help="Port to listen on. (default: %(default)s)")
    serve.add_argument("--routing", choices=("prefix", "least_requests"), default=None,
                       help="prefix (default): requests sharing a prompt prefix go to the same replica, under a "
                            "bounded load; least_requests: fewest in flight.")
    serve.add_argument("--load-factor", type=float, default=None,
                       help="Bounded-load factor c: no replica takes more than c x its fair share. (default 1.25)")
    serve.add_argument("--db", default=None, metavar="PATH|URL",
                       help="Key database: a SQLite file (default tokenmill-gateway.db) or postgresql://... "
                            "(several gateways share it).")
    serve.add_argument("--redis-url", default=None, metavar="URL",
                       help="Share limits and budgets with other gateways through this Redis (exact across "
                            "replicas). Default: limits in this process.")
    serve.add_argument("--admin-key", default=None,
                       help=f"Admin API key (default ${ADMIN_KEY_ENV}); without one the admin API is off.")
    serve.add_argument("--no-auth", action="store_true",
                       help="Serve without API keys (a load balancer; model limits still apply).")
    serve.add_argument("--health-interval", type=float, default=None, metavar="S",
                       help="Seconds between active health checks of each backend. (default 5)")
    serve.add_argument("--num-retries", type=int, default=None,
                       help="Other backends tried before the first byte on connect errors, 429 and 503. (default 2)")
    serve.add_argument("--access-log", default="-", metavar="PATH|-|off",
                       help="JSON access log: a file, - for stderr, off. (default: -)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=_cmd_serve)

    keys = gsub.add_parser("keys", help="Create, list, update, rotate and revoke API keys (via the admin API).",
                           description="Manage keys through a running gateway's admin API. " + _KEY_FIELDS_HELP)
    keys.add_argument("--url", default="http://127.0.0.1:4000", help="The gateway. (default: %(default)s)")
    keys.add_argument("--admin-key", default=None, help=f"Admin key (default ${ADMIN_KEY_ENV}).")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ksub.add_parser("create", help="A new key (printed once; only its hash is stored).")
    update = ksub.add_parser("update", help="Change a key's limits, models, metadata or expiry.")
    update.add_argument("key_id")
    for p in (create, update):
        p.add_argument("--alias", dest="key_alias", default=None, help="A readable name (metrics and logs use it).")
        p.add_argument("--models", default=None, help="Comma-separated models the key may use (default: all).")
        p.add_argument("--team", default=None, help="Metadata: team.")
        p.add_argument("--user", default=None, help="Metadata: user.")
        p.add_argument("--duration", default=None, help="Expires after e.g. 30d, 12h (default: never).")
        p.add_argument("--rpm", dest="rpm_limit", type=int, default=None, help="Requests per minute.")
        p.add_argument("--tpm", dest="tpm_limit", type=int, default=None, help="Tokens per minute.")
        p.add_argument("--max-parallel", dest="max_parallel_requests", type=int, default=None,
                       help="Concurrent requests.")
        p.add_argument("--max-budget", type=float, default=None, help="US dollars per budget period.")
        p.add_argument("--max-budget-tokens", type=int, default=None, help="Tokens per budget period.")
        p.add_argument("--budget-duration", choices=("daily", "monthly", "total"), default=None)
    ksub.add_parser("list", help="All keys (never the secrets).")
    info = ksub.add_parser("info", help="One key and its spend.")
    info.add_argument("key_id")
    rotate = ksub.add_parser("rotate", help="A new secret for a key; limits and spend stay.")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-period", default=None, help="How long the old secret still works, e.g. 1h.")
    revoke = ksub.add_parser("revoke", help="Revoke keys at once.")
    revoke.add_argument("key_ids", nargs="+")
    keys.set_defaults(func=_cmd_keys)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.gateway.app import Gateway
    from tokenmill.gateway.backends import BackendConfig, HealthConfig
    from tokenmill.gateway.config import RetryConfig, build_config, load_file
    from tokenmill.gateway.routing import RoutingConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("tokenmill.gateway.access")
    access.propagate = False
    if args.access_log != "off":
        handler = logging.StreamHandler(sys.stderr) if args.access_log == "-" else logging.FileHandler(args.access_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    try:
        base = load_file(args.config) if args.config else {}
        base["routing"] = _override(base.get("routing", RoutingConfig()), policy=args.routing,
                                    load_factor=args.load_factor)
        base["health"] = _override(base.get("health", HealthConfig()), interval_s=args.health_interval)
        base["retry"] = _override(base.get("retry", RetryConfig()), num_retries=args.num_retries)
        if args.backend:
            base["backends"] = tuple(BackendConfig.parse(b) for b in args.backend)
        base.update({k: v for k, v in (("db", args.db), ("redis_url", args.redis_url),
                                       ("admin_key", args.admin_key)) if v is not None})
        if args.no_auth:
            base["require_auth"] = False
        base["access_log"] = args.access_log != "off"
        gateway = Gateway(build_config(**base))
    except (ValueError, RuntimeError) as e:
        print(f"tokenmill gateway: {e}", file=sys.stderr)
        return 2
    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = "httptools" if _has("httptools") else "h11"
    # No X-Forwarded-* rewriting (the gateway logs no client address), no uvicorn access log
    # (the gateway writes its own): less work per request.
    uvicorn.run(gateway, host=args.host, port=args.port, loop=loop, http=http, access_log=False, proxy_headers=False,
                log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _override(obj, **changes):
    """A config dataclass with the command line's values (None: not given) over it."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cmd_keys(args: argparse.Namespace) -> int:
    import httpx

    admin_key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not admin_key:
        print(f"tokenmill gateway keys: give --admin-key or set ${ADMIN_KEY_ENV}", file=sys.stderr)
        return 2
    cmd = args.keys_cmd
    body: dict = {}
    if cmd in ("create", "update"):
        names = ("key_alias", "duration", "rpm_limit", "tpm_limit", "max_parallel_requests", "max_budget",
                 "max_budget_tokens", "budget_duration")
        body = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        if args.models:
            body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        meta = {k: v for k, v in (("team", args.team), ("user", args.user)) if v}
        if meta:
            body["metadata"] = meta
    method, path = {"create": ("POST", "/key/generate"), "update": ("POST", "/key/update"),
                    "list": ("GET", "/key/list"), "info": ("GET", "/key/info"),
                    "rotate": ("POST", "/key/regenerate"), "revoke": ("POST", "/key/delete")}[cmd]
    params = None
    if cmd in ("update", "rotate"):
        body["key_id"] = args.key_id
    if cmd == "rotate" and args.grace_period:
        body["grace_period"] = args.grace_period
    if cmd == "revoke":
        body = {"key_ids": args.key_ids}
    if cmd == "info":
        params = {"key_id": args.key_id}
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body if method == "POST" else None,
                          params=params, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    except httpx.TransportError as e:
        print(f"tokenmill gateway keys: cannot reach the gateway at {args.url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2))
    return 0 if r.status_code == 200 else 1
