"""`tokenmill serve --ray`: deploy the Serve application on a Ray cluster and hold it until
SIGTERM/SIGINT, then delete it. A cluster it joined keeps running; Serve itself is shut down
only if this process started it."""

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

    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
    else:
        logger.info("RAY_ADDRESS not set: starting a local Ray instance")
    ray.init(address=address, log_to_driver=True)
    started_serve = False
    try:
        running = _serve_http_options()
        if running is not None and running != (args.host, args.port):
            logger.error("Serve already runs on this cluster at %s:%d; it cannot also listen at %s:%d "
                         "(one HTTP address per cluster): pass --host %s --port %d", *running, args.host,
                         args.port, *running)
            return 2
        started_serve = running is None
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location=args.ray_proxy_location)
        deployment = config.deployment_config
        replicas = deployment.get("num_replicas") or deployment.get("autoscaling_config")
        logger.info("deploying %r: engine replicas %s, each %s; routing %s; each replica loads the model",
                    args.ray_app_name, replicas, deployment["ray_actor_options"], config.routing_policy)
        start = time.monotonic()
        try:
            serve.run(build_application(config), name=args.ray_app_name, route_prefix="/", blocking=False)
        except (RuntimeError, ValueError) as e:  # a replica failed to start: Serve says why
            logger.error("deploying %r failed: %s", args.ray_app_name, e)
            return 1
        logger.info("ready in %.1f s: serving at http://%s:%d/v1 (metrics of every replica at /metrics)",
                    time.monotonic() - start, args.host, args.port)
        _wait_for_signal()
        logger.info("stopping: deleting application %r", args.ray_app_name)
        return 0
    finally:
        _cleanup(args.ray_app_name, started_serve)


def _serve_http_options() -> tuple[str, int] | None:
    """(host, port) of the Serve instance already running on the cluster, else None."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    config = ray.get(controller.get_http_config.remote())
    return config.host, config.port


def _wait_for_signal() -> None:
    # Installed once the app runs: before that, Ctrl-C interrupts the deploy (KeyboardInterrupt).
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _cleanup(app_name: str, started_serve: bool) -> None:
    import ray
    from ray import serve

    from tokenmill.ray.replica_metrics import directory_name

    try:
        if started_serve:
            serve.shutdown()  # also the directory actor (registered for it)
        else:
            serve.delete(app_name)
            try:
                ray.kill(ray.get_actor(directory_name(app_name), namespace="serve"))
            except ValueError:
                pass
    finally:
        ray.shutdown()
