"""The OpenAI-compatible HTTP server: app wiring, lifespan and `run_server` only.

Handlers live in serving_*.py, schemas in protocol.py, metrics in metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

import tokenmill
from tokenmill.config import EngineConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.server.admission import Admission
from tokenmill.server.args import ServerSettings, server_settings
from tokenmill.server.drain import ABORT_GRACE_S, Drain
from tokenmill.server.errors import APIError, error_body, unavailable
from tokenmill.server.json_logs import configure_logging, uvicorn_log_config
from tokenmill.server.limits import RequestLimits
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.middleware import RequestContextMiddleware
from tokenmill.server.openapi import document_routes
from tokenmill.server.prompt_encoder import PromptEncoder
from tokenmill.server.request_tracker import RequestTracker
from tokenmill.server.serving_chat import ServingChat
from tokenmill.server.serving_completions import ServingCompletion
from tokenmill.server.serving_tokenization import ServingTokenization, json_response
from tokenmill.server.tracing import create_tracer, require_tracing

logger = logging.getLogger("tokenmill.server")


@dataclass
class ServerState:
    """What the routes need; one per app, stored in app.state.server."""

    engine: AsyncLLM
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission
    drain: Drain
    limits: RequestLimits
    encoder: PromptEncoder
    completions: ServingCompletion
    chat: ServingChat
    tokenization: ServingTokenization
    created: int


def build_app(
    engine_config: EngineConfig,
    settings: ServerSettings,
    engine: AsyncLLM | None = None,
    url: str | None = None,
) -> FastAPI:
    """The FastAPI app serving one engine. The engine thread starts with the app's lifespan.

    Args:
        engine_config: the engine's configuration, to build the engine from.
        settings: the HTTP layer's settings.
        engine: an already built AsyncLLM of `engine_config` (run_server builds it first, to
            log the load time); built here when None.
        url: where the server listens, for the startup log.
    """
    engine = engine or AsyncLLM(engine_config)
    sched = engine.config.scheduler
    metrics = ServerMetrics(engine, settings.model_name, sched.max_model_len)
    engine.on_output.append(metrics.on_output)
    drain = Drain(engine, settings.drain_timeout_s)
    admission = Admission(sched.max_num_seqs, settings.max_waiting_requests, lambda: drain.is_draining,
                          on_reject=metrics.record_rejection)
    limits = RequestLimits.for_model(engine.tokenizer, sched.max_model_len, admission.capacity,
                                     settings.max_request_body_bytes)
    encoder = PromptEncoder(engine.tokenizer)
    tracer = None
    if settings.otlp_traces_endpoint:
        tracer = create_tracer(settings.otlp_traces_endpoint, settings.model_name)
    # Follows each request to its end (an observer of every engine output) for its JSON log
    # record and its span; a text log line has no fields to fill: no cost then.
    wants_timings = settings.log_requests and settings.log_format == "json"
    tracker = RequestTracker(tracer) if wants_timings or tracer is not None else None
    if tracker is not None:
        engine.on_output.append(tracker.on_output)
    parts = (engine, settings, metrics, admission, encoder, limits, tracker)
    state = ServerState(engine, settings, metrics, admission, drain, limits, encoder, ServingCompletion(*parts),
                        ServingChat(*parts), ServingTokenization(*parts), int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.bind(asyncio.get_running_loop())
        engine.start()
        where = f" at {url}/v1" if url else ""
        logger.info("serving model %r%s", settings.model_name, where)
        if tracer is not None:
            logger.info("exporting traces to %s", settings.otlp_traces_endpoint)
        try:
            yield
        finally:
            drain.is_draining = True
            engine.shutdown()
            encoder.shutdown()
            if tracer is not None:
                tracer.shutdown()  # sends the spans still batched
            logger.info("engine stopped")

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)
    app.state.server = state
    app.add_middleware(RequestContextMiddleware, api_key=settings.api_key, drain=drain,
                       max_body_bytes=limits.max_body_bytes, routes=app.routes, on_response=metrics.record_http)
    _add_exception_handlers(app)
    _add_routes(app, state)
    document_routes(app, has_api_key=settings.api_key is not None)
    return app


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", code=str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        return JSONResponse(error_body(f"Invalid request: {e.errors()[0].get('msg')}", "invalid_request_error"),
                            status_code=400)


def _add_routes(app: FastAPI, s: ServerState) -> None:
    # POST handlers take the raw request (parsed by serving_*.py into protocol.py's models)
    # and run until their client leaves; openapi.py documents their bodies.
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await s.completions.handle(request, s.completions.create)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await s.chat.handle(request, s.chat.create)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await s.tokenization.handle(request, s.tokenization.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await s.tokenization.handle(request, s.tokenization.detokenize)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response(s.tokenization.models(s.created))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        s.tokenization.check_model(model_id)
        return json_response(next(c for c in s.tokenization.models(s.created).data if c.id == model_id))

    @app.get("/health")
    async def health() -> Response:
        if not s.engine.is_alive:
            return unavailable("The engine is not running.", code="engine_dead").response()
        if s.drain.is_draining:
            return unavailable("The server is shutting down.", code="shutting_down").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version(request: Request) -> Response:
        return json_response(s.tokenization.version(request.state.authorized))


# uvicorn's pure-Python HTTP parser, the one the hostile-client tests run against (httptools,
# installed for the gateway, answers requests it cannot parse, odd methods among them, itself:
# they would never reach the server's metrics and errors). The engine, not parsing, is the
# cost of a request here.
HTTP_PARSER = "h11"


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on the first shutdown signal (drain.py) and exiting only
    once the drain is over; the listener stays open meanwhile."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit or not self.started:  # nothing to drain yet, or the drain is over:
            super().handle_exit(sig, frame)  # uvicorn's own handling (a repeated Ctrl-C forces)
            return
        self._drain.request_from_signal(signal.Signals(sig).name, on_done=self._drained)

    def _drained(self) -> None:
        self.should_exit = True


def run_server(args: argparse.Namespace) -> int:
    """`tokenmill serve`: load the model, then serve until SIGTERM/SIGINT. Returns the exit code."""
    from tokenmill.cli import engine_kwargs
    from tokenmill.config import create_engine_config

    configure_logging(args.log_format, args.log_level)
    try:
        settings = server_settings(args)
        if settings.otlp_traces_endpoint:
            require_tracing()  # before the model loads: a missing package is a quick, clear error
        start = time.monotonic()
        config = create_engine_config(args.model, **engine_kwargs(args))
        engine = AsyncLLM(config)
    except (OSError, ValueError) as e:
        logger.error("cannot start the server: %s", e)
        return 2
    core = engine.core
    logger.info("loaded %s (%s, %s on %s) in %.1f s", config.model_path, config.model.architecture,
                str(config.dtype).removeprefix("torch."), config.device, time.monotonic() - start)
    logger.info("KV cache: %d blocks x %d tokens = %d tokens; max_model_len=%d, max_num_seqs=%d, "
                "max_num_batched_tokens=%d, prefix caching %s", core.num_kv_blocks, config.cache.block_size,
                core.kv_capacity_tokens, config.scheduler.max_model_len, config.scheduler.max_num_seqs,
                config.scheduler.max_num_batched_tokens, "on" if config.cache.enable_prefix_caching else "off")
    url = f"http://{args.host}:{args.port}"
    app = build_app(config, settings, engine, url=url)
    # The drain has ended every request by the time uvicorn shuts down; its own timeout only
    # catches a connection stuck on a client that does not read.
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                               log_config=uvicorn_log_config(args.log_format),
                               timeout_graceful_shutdown=ABORT_GRACE_S, http=HTTP_PARSER)
    server = _DrainingServer(uv_config, app.state.server.drain)
    server.run()
    return 0 if server.started else 1
