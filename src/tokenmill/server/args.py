"""`tokenmill serve` options that belong to the HTTP server (engine options live in cli.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from tokenmill.config import DEMO_MODEL_DIR

# The name the bundled demo model is served under (its directory is just "demo_model").
DEMO_MODEL_NAME = "tokenmill-demo"
API_KEY_ENV = "TOKENMILL_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP layer needs besides the engine config."""

    served_model_names: tuple[str, ...]  # the first is reported in responses
    api_key: str | None = None  # None: no authentication
    max_waiting_requests: int = 256  # sequences queued beyond running ones, then 503
    drain_timeout_s: float = 30.0  # SIGTERM: how long running requests may take to finish
    max_logprobs: int = 20  # most top alternatives per position a request may ask for
    log_requests: bool = True
    log_format: str = "text"  # "json": request records carry their timings (json_logs.py)
    max_request_body_bytes: int | None = None  # None: sized from max_model_len (limits.py)
    otlp_traces_endpoint: str | None = None  # None: no traces (tracing.py)

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed.")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be non-negative, got {self.max_waiting_requests}.")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout must be non-negative, got {self.drain_timeout_s}.")
        if self.max_request_body_bytes is not None and self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be positive, got {self.max_request_body_bytes}.")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def default_model_name(model_dir: str | None) -> str:
    """The checkpoint directory's name (a GGUF file's without .gguf), as
    `--served-model-name` would be set by hand; the default model is `smollm2-135m-instruct`."""
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME, is_default_model

    if is_default_model(model_dir):
        return DEFAULT_MODEL_NAME
    path = Path(model_dir).resolve()
    if path == Path(DEMO_MODEL_DIR).resolve():
        return DEMO_MODEL_NAME
    return path.stem if path.is_file() else path.name


def add_server_args(p: argparse.ArgumentParser) -> None:
    """HTTP server options of `tokenmill serve`."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on; 0.0.0.0 for every interface. (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on. (default: 8000)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="Name(s) clients pass as `model`; the first is reported in responses. "
                        "(default: the model directory's or GGUF file's name, 'smollm2-135m-instruct' "
                        "for the default model)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help="Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize. "
                        f"(default: ${API_KEY_ENV}, else no key)")
    g.add_argument("--max-waiting-requests", type=int, default=256,
                   help="Sequences that may wait for a batch slot (a request counts n per prompt); "
                        "past this, new requests get 503 with Retry-After. (default: 256)")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="On SIGTERM/SIGINT answer new requests with 503, let running requests finish for "
                        "up to this long, then end the rest with an error and exit. A second signal "
                        "ends them at once. (default: 30)")
    g.add_argument("--max-request-body-bytes", type=int, default=None, metavar="BYTES",
                   help="Largest request body accepted; larger ones get 413 before they are read. "
                        "(default: 64 bytes per token of max_model_len, at least 1 MiB)")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="Most top-logprob alternatives one request may ask for. (default: 20)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="tokenmill's log level. (default: info)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level; info includes one access-log line per request. (default: info)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="Do not log one summary line per finished request.")
    g.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: human-readable lines; json: one JSON object per line (uvicorn's too), each "
                        "request's record with its request id, trace id, status, tokens and timings. "
                        "(default: text)")
    g.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="Export one OpenTelemetry span per request (vLLM's `llm_request`, with queue, prefill "
                        "and decode child spans) to this OTLP receiver, e.g. http://localhost:4317; "
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc (default) or http/protobuf. Follows the "
                        "caller's W3C traceparent. Needs `pip install 'tokenmill[otel]'`. (default: off)")


def server_settings(args: argparse.Namespace) -> ServerSettings:
    names = tuple(args.served_model_name or [default_model_name(args.model)])
    return ServerSettings(
        served_model_names=names,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        drain_timeout_s=args.drain_timeout,
        max_logprobs=args.max_logprobs,
        log_requests=not args.disable_log_requests,
        log_format=args.log_format,
        max_request_body_bytes=args.max_request_body_bytes,
        otlp_traces_endpoint=args.otlp_traces_endpoint or None,
    )
