"""The Ray Serve application's settings: one `RayAppConfig` from `build_app`'s args (a Serve
config file's `args:`) or from `tokenmill serve --ray`'s flags.

Engine and server options are not redefined here: `engine_kwargs` holds `tokenmill serve`
options by their snake_case names and becomes that command's argv, parsed by its own parser
in every replica (one definition of each flag). No Ray import: the CLI validates before it
connects to a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cli import _parse_json_object
from tokenmill.gateway.routing import POLICIES, RoutingConfig

# Serve's own router (power of two choices on queue lengths) instead of tokenmill's policy.
POWER_OF_TWO = "power_of_two"
ROUTING_POLICIES = (*POLICIES, POWER_OF_TWO)
ARGS_KEYS = ("model", "engine_kwargs", "deployment_config", "routing", "stream_batching_interval_ms")
# A streamed response crosses Ray twice per item (replica -> ingress -> proxy), about 4 ms of
# CPU per item in the ingress and the proxy together (docs/deploy.md): a replica sends what a
# stream produced in 50 ms as one item instead of one item per token. Ray Serve LLM's default
# and name.
DEFAULT_STREAM_BATCHING_INTERVAL_MS = 50.0
# Serve's proxy listens for HTTP, not the replicas: these `tokenmill serve` options belong to it.
HTTP_OPTIONS = ("host", "port")
# An engine with continuous batching wants many requests at once (Serve's default is 5);
# tokenmill's own admission control (--max-num-seqs, --max-waiting-requests) queues the rest.
DEFAULT_MAX_ONGOING_REQUESTS = 256
# The ingress reads a body before it forwards it; replicas enforce their exact limit (413).
DEFAULT_INGRESS_MAX_BODY_BYTES = 64 * 2**20
RAY_GROUP = "ray serve (with --ray)"


@dataclass(frozen=True)
class RayAppConfig:
    """Everything `build_app` needs, validated."""

    serve_argv: tuple[str, ...] = ()  # `tokenmill serve` options each replica parses
    deployment_config: dict[str, Any] = field(default_factory=dict)  # Serve options of the engine
    routing_policy: str = "prefix"
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # unused with power_of_two
    max_request_body_bytes: int = DEFAULT_INGRESS_MAX_BODY_BYTES
    stream_batching_interval_ms: float = DEFAULT_STREAM_BATCHING_INTERVAL_MS  # 0: one item per message

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> RayAppConfig:
        """From `build_app`'s dict; ValueError naming the offending key."""
        args = dict(args or {})
        unknown = sorted(set(args) - set(ARGS_KEYS))
        if unknown:
            raise ValueError(f"unknown tokenmill.ray:build_app arg(s) {unknown}; expected {list(ARGS_KEYS)}")
        engine_kwargs = _mapping(args, "engine_kwargs")
        if args.get("model") is not None:
            engine_kwargs = {"model": args["model"], **engine_kwargs}
        if engine_kwargs.get("model") and os.path.exists(engine_kwargs["model"]):
            # Replicas run in other working directories: a relative path would not resolve.
            engine_kwargs["model"] = os.path.abspath(engine_kwargs["model"])
        argv = tuple(engine_kwargs_to_argv(engine_kwargs))
        parsed = parse_serve_argv(argv)  # every option checked now, not in each replica later
        deployment = {"max_ongoing_requests": DEFAULT_MAX_ONGOING_REQUESTS, **_mapping(args, "deployment_config")}
        actor = dict(deployment.get("ray_actor_options") or {})
        actor.setdefault("num_cpus", 1)
        if str(parsed.device).startswith("cuda"):
            actor.setdefault("num_gpus", 1)
        deployment["ray_actor_options"] = actor
        # A replica Serve removes (scale-down, redeploy) lets its requests finish for as long
        # as `tokenmill serve` would on SIGTERM.
        deployment.setdefault("graceful_shutdown_timeout_s", parsed.drain_timeout)
        if "num_replicas" in deployment and "autoscaling_config" in deployment:
            raise ValueError("deployment_config: give num_replicas or autoscaling_config, not both")
        routing = _mapping(args, "routing")
        policy = routing.pop("policy", "prefix")
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing.policy must be one of {', '.join(ROUTING_POLICIES)}, not {policy!r}")
        try:
            routing_config = RoutingConfig(**({"policy": policy} if policy != POWER_OF_TWO else {}), **routing)
        except TypeError as e:
            raise ValueError(f"routing: {e}") from None
        interval_ms = args.get("stream_batching_interval_ms", DEFAULT_STREAM_BATCHING_INTERVAL_MS)
        if not isinstance(interval_ms, (int, float)) or interval_ms < 0:
            raise ValueError(f"stream_batching_interval_ms must be a number >= 0, not {interval_ms!r}")
        return cls(argv, deployment, policy, routing_config,
                   parsed.max_request_body_bytes or DEFAULT_INGRESS_MAX_BODY_BYTES, float(interval_ms))


def _mapping(args: dict[str, Any], key: str) -> dict[str, Any]:
    value = args.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
    return dict(value)


@functools.cache
def serve_parser() -> argparse.ArgumentParser:
    """The `tokenmill serve` subcommand's parser (the one definition of its options); built
    once per process (parsing does not change it)."""
    from tokenmill.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _replica_options() -> dict[str, argparse.Action]:
    """`tokenmill serve` options a replica takes, by dest: all but --help, --host/--port
    (Serve's proxy listens) and the --ray group (the driver's)."""
    parser = serve_parser()
    ray_group = next(g for g in parser._action_groups if g.title == RAY_GROUP)
    skip = {id(a) for a in ray_group._group_actions}
    return {a.dest: a for a in parser._actions
            if a.option_strings and id(a) not in skip and a.dest not in (*HTTP_OPTIONS, "help")}


def parse_serve_argv(argv: tuple[str, ...] | list[str]) -> argparse.Namespace:
    """`tokenmill serve ARGV` parsed; ValueError with argparse's message instead of an exit."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return serve_parser().parse_args(list(argv))
    except SystemExit:
        message = err.getvalue().strip().splitlines()
        raise ValueError(f"engine_kwargs: {message[-1] if message else 'invalid options'}") from None


def engine_kwargs_to_argv(engine_kwargs: dict[str, Any]) -> list[str]:
    """{"max_model_len": 2048, "enable_prefix_caching": False} -> ["--max-model-len", "2048",
    "--no-enable-prefix-caching"], by the serve parser's own actions."""
    actions = _replica_options()
    argv: list[str] = []
    for key, value in engine_kwargs.items():
        if key in HTTP_OPTIONS:
            raise ValueError(f"engine_kwargs.{key}: Serve's HTTP proxy listens, not the replicas "
                             "(set http_options in the Serve config, or --host/--port with --ray)")
        action = actions.get(key)
        if action is None:
            raise ValueError(f"engine_kwargs: {key!r} is not a `tokenmill serve` option "
                             "(see `tokenmill serve --help`; names in snake_case)")
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(action, argparse._StoreTrueAction):
            argv.extend([flag] if value else [])
        elif isinstance(value, (list, tuple)):
            argv.extend([flag, *map(str, value)])
        elif isinstance(value, dict):  # e.g. speculative_config, a JSON object on the command line
            argv.extend([flag, json.dumps(value)])
        elif value is not None:
            argv.extend([flag, str(value)])
    return argv


def engine_kwargs_from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The `tokenmill serve` options given on the command line (those differing from their
    defaults), for `tokenmill serve --ray` to hand to its replicas."""
    out = {}
    for dest, action in _replica_options().items():
        value = getattr(args, dest, action.default)
        # The API key too when it came from the environment: replicas on other nodes lack it.
        if value != action.default or (dest == "api_key" and value):
            out[dest] = value
    return out


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """`tokenmill serve --ray` options (docs/deploy.md)."""
    g = p.add_argument_group(RAY_GROUP)
    g.add_argument("--ray", action="store_true",
                   help="Serve on a Ray cluster with Ray Serve: the cluster at $RAY_ADDRESS, else a local one. "
                        "Each replica owns one engine; one OpenAI-compatible endpoint at --host/--port routes "
                        "to them (pip install 'tokenmill[ray]').")
    g.add_argument("--num-replicas", type=int, default=None,
                   help="Engine replicas, fixed. (default: 1, or autoscaling with --max-replicas)")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="Autoscaling: fewest replicas; 0 scales to zero when idle. (default: 1)")
    g.add_argument("--max-replicas", type=int, default=None, help="Autoscaling on: most replicas.")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="Autoscaling: requests in flight per replica Serve aims for. (default: Serve's, 2)")
    g.add_argument("--upscale-delay", type=float, default=None, metavar="SECONDS",
                   help="Autoscaling: how long load must stay high before adding replicas. (default: Serve's, 30)")
    g.add_argument("--downscale-delay", type=float, default=None, metavar="SECONDS",
                   help="Autoscaling: how long load must stay low before removing replicas. (default: Serve's, 600)")
    g.add_argument("--replica-cpus", type=float, default=1,
                   help="CPUs each replica reserves from Ray (also its thread count). (default: 1)")
    g.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs each replica reserves. (default: 1 with --device cuda, else 0)")
    g.add_argument("--max-ongoing-requests", type=int, default=DEFAULT_MAX_ONGOING_REQUESTS,
                   help="Requests Serve sends one replica at once; more wait in Serve's queue. "
                        f"(default: {DEFAULT_MAX_ONGOING_REQUESTS})")
    g.add_argument("--routing", choices=ROUTING_POLICIES, default="prefix",
                   help="prefix: requests sharing a prompt prefix go to the replica that has it cached, under a "
                        "bounded load (as `tokenmill gateway`); least_requests: fewest in flight; power_of_two: "
                        "Serve's own router. (default: prefix)")
    g.add_argument("--deployment-config", type=_parse_json_object, default=None, metavar="JSON",
                   help="More Serve options of the engine deployment, as build_app's deployment_config "
                        "(e.g. '{\"autoscaling_config\": {\"look_back_period_s\": 10}}'); merged over the flags.")
    g.add_argument("--stream-batching-interval-ms", type=float, default=DEFAULT_STREAM_BATCHING_INTERVAL_MS,
                   metavar="MS", help="A replica sends each stream's new events at most this often, as one Ray "
                                      "item (the first at once): less CPU per token in Ray, burstier arrival. 0: "
                                      "every event on its own. (default: %(default)s, as Ray Serve LLM)")
    g.add_argument("--ray-proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                   help="Where Serve runs its HTTP proxy. (default: EveryNode)")
    g.add_argument("--ray-app-name", default="tokenmill", help="The Serve application's name. (default: tokenmill)")


def ray_flags_given(args: argparse.Namespace) -> list[str]:
    """The --ray group's flags set on the command line (an error without --ray)."""
    group = next(g for g in serve_parser()._action_groups if g.title == RAY_GROUP)
    return [a.option_strings[0] for a in group._group_actions
            if a.dest != "ray" and getattr(args, a.dest, a.default) != a.default]


def ray_args(args: argparse.Namespace) -> dict[str, Any]:
    """`tokenmill serve --ray`'s flags as `build_app`'s args (the same path as a config file)."""
    deployment: dict[str, Any] = {"max_ongoing_requests": args.max_ongoing_requests,
                                  "ray_actor_options": {"num_cpus": args.replica_cpus}}
    if args.replica_gpus is not None:
        deployment["ray_actor_options"]["num_gpus"] = args.replica_gpus
    autoscaling = {key: value for key, value in (
        ("min_replicas", args.min_replicas), ("max_replicas", args.max_replicas),
        ("target_ongoing_requests", args.target_ongoing_requests),
        ("upscale_delay_s", args.upscale_delay), ("downscale_delay_s", args.downscale_delay)) if value is not None}
    if autoscaling:
        if args.max_replicas is None:
            raise ValueError("autoscaling needs --max-replicas")
        if args.num_replicas is not None:
            raise ValueError("give --num-replicas or autoscaling (--max-replicas ...), not both")
        deployment["autoscaling_config"] = autoscaling
    else:
        deployment["num_replicas"] = args.num_replicas or 1
    for key, value in (args.deployment_config or {}).items():
        deployment[key] = {**deployment.get(key, {}), **value} if isinstance(value, dict) else value
    if "autoscaling_config" in deployment:
        deployment.pop("num_replicas", None)
    return {"engine_kwargs": engine_kwargs_from_namespace(args), "deployment_config": deployment,
            "routing": {"policy": args.routing}, "stream_batching_interval_ms": args.stream_batching_interval_ms}
