"""`tokenmill serve --log-format text|json`: the process's logging set-up.

json: every line on stderr is one JSON object (what Loki, Elasticsearch, Cloud Logging and
`jq` read without a parsing rule): `timestamp` (UTC, ISO 8601), `level`, `logger`, `message`,
then the record's own fields. A record written while a request runs carries its
`request_id` (the X-Request-Id), and its `trace_id` once the request has one; the request's
"finished" record adds method, path, status, tokens and timings (responses.py). uvicorn's
records (startup, access log) go through the same handler. Standard library only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import Any

from tokenmill.server.request_context import current_request

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: anything else on a record came from `extra=` (or a filter)
# and becomes a field. uvicorn's color_message repeats the message with terminal colours.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message", "taskName"}
# uvicorn's access-log record is a format string and these arguments (also the middleware's
# 499 line, written in the same format).
_ACCESS_ARGS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is the `exception` field)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            out.update(zip(_ACCESS_ARGS, record.args))
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a stderr that is not UTF-8 still takes every line.
        return json.dumps(out, default=str)


class RequestContextFilter(logging.Filter):
    """Adds the current request's id, and its trace id once known, to every record written
    on its behalf (a warning about a request's field, an error's traceback, the access line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_request()
        if ctx is not None:
            if not hasattr(record, "request_id"):
                record.request_id = ctx.request_id
            if ctx.trace_id is not None and not hasattr(record, "trace_id"):
                record.trace_id = ctx.trace_id
        return True


def configure_logging(log_format: str, log_level: str) -> None:
    """Root handler on stderr in `log_format`; tokenmill's loggers at `log_level`."""
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestContextFilter())
        logging.basicConfig(handlers=[handler])
        # What would otherwise reach stderr as plain text: warnings.warn (torch's, among
        # others) and uncaught exceptions, in the main thread or any other.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    else:
        logging.basicConfig(format=TEXT_FORMAT)
    logging.getLogger("tokenmill").setLevel(log_level.upper())


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    logging.getLogger("tokenmill").critical("uncaught exception", exc_info=(exc_type, exc_value, exc_traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # a thread's normal way out, as the default hook has it
        return
    logging.getLogger("tokenmill").critical(
        "uncaught exception in thread %s", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def uvicorn_log_config(log_format: str) -> dict | None:
    """uvicorn.Config's log_config: its own coloured text set-up, or none in json, so that its
    loggers propagate to the root's JSON handler."""
    if log_format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
