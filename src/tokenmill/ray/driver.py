"""`tokenmill serve --ray`: deploy the Serve application on a Ray cluster and hold it until
SIGTERM/SIGINT, then delete it (the cluster, if it was there before, keeps running)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

logger = logging.getLogger("tokenmill.ray")


def run_ray_server(args: argparse.Namespace) -> int:
    from tokenmill.ray.config import RayAppConfig, ray_args

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tokenmill").setLevel(args.log_level.upper())
    try:
        config = RayAppConfig.from_args(ray_args(args))
    except ValueError as e:
        logger.error("cannot start: %s", e)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        logger.error("--ray needs Ray Serve: pip install 'tokenmill[ray]'")
        return 2
    from tokenmill.ray.app import build_application
    from tokenmill.ray.replica_metrics import directory

    address = os.environ.get("RAY_ADDRESS")
    logger.info("connecting to the Ray cluster at %s", address) if address else logger.info(
        "RAY_ADDRESS not set: starting a local Ray instance")
    ray.init(address=address, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port}, proxy_location=args.ray_proxy_location)
    deployment = config.deployment_config
    replicas = deployment.get("num_replicas") or deployment.get("autoscaling_config")
    logger.info("deploying %r: engine replicas %s, each %s; routing %s; loading the model in each replica",
                args.ray_app_name, replicas, deployment["ray_actor_options"], config.routing_policy)
    start = time.monotonic()
    try:
        serve.run(build_application(config), name=args.ray_app_name, route_prefix="/", blocking=False)
        logger.info("ready in %.1f s: serving at http://%s:%d/v1 (metrics of every replica at /metrics)",
                    time.monotonic() - start, args.host, args.port)
        while not stop.wait(1.0):
            pass
        logger.info("stopping: deleting application %r", args.ray_app_name)
    finally:
        serve.delete(args.ray_app_name)
        ray.kill(directory(args.ray_app_name))
        ray.shutdown()
    return 0
