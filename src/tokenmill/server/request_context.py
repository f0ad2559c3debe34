"""What one HTTP request is known by in the server's logs and traces.

The middleware makes a `RequestContext` for each request and binds it to a context
variable for as long as the request runs; asyncio copies context variables into the tasks a
request starts (the disconnect watcher's, the SSE body's), so the handlers, the engine
stream wrapper and every log record written on the request's behalf find the same object
without it being passed through each call.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.server.request_tracker import FinishedRequest

# The W3C Trace Context headers: the caller's span, and vendor state to pass on unchanged.
TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass
class RequestContext:
    """One HTTP request, from the middleware's first look to its last byte."""

    request_id: str  # X-Request-Id: the client's if tame, else a new one; echoed in the response
    trace_headers: dict[str, str]  # the TRACE_HEADERS the client sent, as sent
    # 32 hex digits: the trace of the request's first span, once exported (tracing on only).
    trace_id: str | None = None
    # Its engine requests that have ended (one per prompt; all n samples of a prompt in one).
    finished: list[FinishedRequest] = field(default_factory=list)

    def timings(self) -> dict[str, float | None]:
        """The request's engine phases in seconds from its first prompt's arrival, over all
        its prompts: queue until the first was scheduled, first token of any, end of the last.
        Each is None when no prompt reached that point (an abort while queued has no ttft)."""
        if not self.finished:
            return {"queue_s": None, "ttft_s": None, "e2e_s": None}
        arrival = min(f.arrival for f in self.finished)

        def since_arrival(times: list[float | None]) -> float | None:
            known = [t for t in times if t is not None]
            return round(max(0.0, min(known) - arrival), 6) if known else None

        return {
            "queue_s": since_arrival([f.first_scheduled for f in self.finished]),
            "ttft_s": since_arrival([f.first_token for f in self.finished]),
            "e2e_s": round(max(f.finished for f in self.finished) - arrival, 6),
        }


_current: ContextVar[RequestContext | None] = ContextVar("tokenmill_request", default=None)


def current_request() -> RequestContext | None:
    """The request this code runs for; None outside one (startup, the engine thread)."""
    return _current.get()


def bind_request(ctx: RequestContext) -> Token:
    """Make `ctx` the current request until `unbind_request(token)`."""
    return _current.set(ctx)


def unbind_request(token: Token) -> None:
    _current.reset(token)


def trace_headers_of(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C Trace Context headers among `headers` (lower-case names, as ASGI has them)."""
    return {name: headers[name] for name in TRACE_HEADERS if headers.get(name)}
