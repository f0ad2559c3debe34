"""Graceful shutdown: on SIGTERM/SIGINT the server keeps listening but takes no new work,
lets the requests in progress finish for up to the drain timeout, then aborts the rest
cleanly and only then lets uvicorn close the listener.

Why the listener stays open: a load balancer or client that connects during the drain
gets a 503 with Retry-After (and /health a 503), which it knows to route elsewhere; a
refused connection looks like a crash. Why the abort is ours, not uvicorn's: uvicorn's
graceful-shutdown timeout cancels the request tasks, which cuts each stream mid-body
and logs a traceback per request; raising an error in each engine stream instead lets
every response end properly (an error event and [DONE], or a 503 body).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tokenmill.engine.async_llm import AsyncLLM

logger = logging.getLogger("tokenmill.server")

# After the abort, how long responses get to write their last bytes (slow readers).
ABORT_GRACE_S = 5.0
_POLL_S = 0.05


class DrainAborted(Exception):
    """Raised in each unfinished engine stream at the drain deadline; the message is for the
    client, `reason` for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"The server is shutting down; the request was aborted ({reason}).")
        self.reason = reason


class Drain:
    """Owns the shutdown state: whether the server is draining, and how many HTTP requests
    are in progress (the middleware counts them). Event-loop thread only, except
    `request_from_signal`."""

    def __init__(self, engine: AsyncLLM, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.is_draining = False
        self.num_active_requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._hurry = asyncio.Event()  # a second signal: abort now

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the server runs on (called at startup)."""
        self._loop = loop

    def request_from_signal(self, signal_name: str, on_done: Callable[[], None]) -> None:
        """From a signal handler: start draining (first signal), or stop waiting for the
        running requests and abort them now (second signal). `on_done` is called on the
        loop once every request has ended: it lets the server close."""
        self.is_draining = True  # at once, for requests already being handled
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_signal, signal_name, on_done)

    def _on_signal(self, signal_name: str, on_done: Callable[[], None]) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run(signal_name, on_done))
        else:
            logger.info("received %s again: aborting the running requests now", signal_name)
            self._hurry.set()

    async def run(self, reason: str, on_done: Callable[[], None]) -> None:
        self.is_draining = True
        logger.info("received %s: draining, %d requests in progress get up to %.0f s to finish",
                    reason, self.num_active_requests, self.timeout_s)
        try:
            if not await self._wait_idle(self.timeout_s):
                why = "a second signal" if self._hurry.is_set() else f"the drain timeout of {self.timeout_s:g} s ran out"
                aborted = self.engine.fail_all(DrainAborted(why))
                logger.warning("%s: aborting %d unfinished engine requests", why, len(aborted))
                if not await self._wait_idle(ABORT_GRACE_S, hurry=False):
                    logger.warning("%d responses still unfinished %.0f s after the abort; closing their "
                                   "connections", self.num_active_requests, ABORT_GRACE_S)
        finally:
            on_done()

    async def _wait_idle(self, timeout_s: float, hurry: bool = True) -> bool:
        """Whether every HTTP request ended within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.num_active_requests > 0:
            if loop.time() >= deadline or (hurry and self._hurry.is_set()):
                return False
            await asyncio.sleep(_POLL_S)
        return True
