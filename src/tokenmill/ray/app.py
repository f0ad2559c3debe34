"""The Serve application: an ingress deployment in front of an engine deployment whose
replicas are routed by tokenmill's policy (request_router.py).

    HTTP -> Serve proxy -> Ingress (ingress.py) --handle--> EngineReplica x N (engine_replica.py)
                                        request_router.py picks the replica
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from tokenmill.ray.config import POWER_OF_TWO, RayAppConfig
from tokenmill.ray.engine_replica import EngineReplica
from tokenmill.ray.ingress import Ingress
from tokenmill.ray.request_router import PrefixAwareRequestRouter

ENGINE_DEPLOYMENT = "TokenmillEngine"
INGRESS_DEPLOYMENT = "TokenmillIngress"


def build_application(config: RayAppConfig) -> serve.Application:
    options: dict[str, Any] = dict(config.deployment_config)
    if config.routing_policy != POWER_OF_TWO:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAwareRequestRouter, request_router_kwargs=dataclasses.asdict(config.routing))
    try:
        engine = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT).options(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"deployment_config: {e}") from None
    # The ingress only parses and relays: no CPU reserved, so it never competes with engines
    # for Ray's CPU slots; Serve's own router is fine in front of it.
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=10_000)
    return ingress.bind(engine.bind(config.serve_argv, config.stream_batching_interval_ms / 1000), config)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """`serve run tokenmill.ray:build_app` / a Serve config file's import_path. `args`:
    model, engine_kwargs (`tokenmill serve` options), deployment_config (Serve options of the
    engine deployment), routing ({policy: prefix | least_requests | power_of_two, ...}),
    stream_batching_interval_ms (50)."""
    return build_application(RayAppConfig.from_args(args))
