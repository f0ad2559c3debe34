"""One Serve replica: one engine and the `tokenmill serve` app around it, in-process.

The replica loads its model once, in its constructor, and then answers `HTTPCall`s from the
ingress by running them through the app (asgi_call.py). Serve restarts a replica whose
`check_health` raises (the engine thread died) and calls `__del__` when it scales down.
"""

from __future__ import annotations

import logging
import time

import ray
from ray import serve

from tokenmill.ray.asgi_call import HTTPCall, call_asgi
from tokenmill.ray.config import parse_serve_argv
from tokenmill.ray.replica_metrics import directory, serve_registry

logger = logging.getLogger("tokenmill.ray")

# Which replica answered, on every response (tests and operators match it to /metrics).
REPLICA_HEADER = "x-tokenmill-replica"


class EngineReplica:
    async def __init__(self, serve_argv: tuple[str, ...], stream_batch_s: float = 0.0) -> None:
        from tokenmill.cli import engine_kwargs
        from tokenmill.config import create_engine_config
        from tokenmill.engine.async_llm import AsyncLLM
        from tokenmill.server.api_server import build_app
        from tokenmill.server.args import server_settings

        args = parse_serve_argv(serve_argv)
        logging.getLogger("tokenmill").setLevel(args.log_level.upper())
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        start = time.monotonic()
        config = create_engine_config(args.model, **engine_kwargs(args))
        self._app = build_app(config, server_settings(args), AsyncLLM(config))
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()  # starts the engine thread, as uvicorn would
        self._state = self._app.state.server
        self._headers = ((REPLICA_HEADER.encode(), self.replica_id.encode()),)
        self._batch_s = stream_batch_s
        self._directory = directory(context.app_name)
        self._metrics_url = serve_registry(self._state.metrics.registry, ray.util.get_node_ip_address())
        await self._directory.register.remote(self.replica_id, self._metrics_url)
        logger.info("replica %s: %s loaded in %.1f s; metrics at %s", self.replica_id, config.model_path,
                    time.monotonic() - start, self._metrics_url)

    async def handle(self, call: HTTPCall):
        """The app's ASGI messages for one request, in batches (a streaming call)."""
        async for batch in call_asgi(self._app, call, self._headers, self._batch_s):
            yield batch

    def check_health(self) -> None:
        if not self._state.engine.is_alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread is not running")
        # Renewed at every check: keeps the entry alive (the directory drops silent ones) and
        # refills a directory that was restarted.
        self._directory.register.remote(self.replica_id, self._metrics_url)

    async def __del__(self) -> None:
        # Serve's graceful shutdown (scale-down, redeploy; also after a failed constructor):
        # leave the directory, stop the engine.
        try:
            if hasattr(self, "_directory"):
                await self._directory.unregister.remote(self.replica_id)
        finally:
            if hasattr(self, "_state"):
                await self._lifespan.__aexit__(None, None, None)
