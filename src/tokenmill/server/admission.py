"""The bounded waiting queue: refuse work past a limit instead of piling it up.

The engine's own queue has no bound, so the server counts the sequences it has handed over
and not yet seen finish (a request counts n per prompt). Those not running are waiting.
`engine.stats.num_running` lags by at most one step, so during a burst the estimate can only
run high: admission errs towards refusing early, never towards an unbounded pile-up.
"""

from __future__ import annotations

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.server.errors import bad_request, unavailable


class Admission:
    """Owns the count of in-flight engine sequences. Event-loop thread only."""

    def __init__(self, engine: AsyncLLM, max_waiting_requests: int) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.num_inflight_seqs = 0
        self.draining = False  # set on SIGTERM: refuse everything new

    @property
    def num_waiting_estimate(self) -> int:
        return max(0, self.num_inflight_seqs - self.engine.stats.num_running)

    def reserve(self, num_seqs: int) -> Reservation:
        """Admit `num_seqs` new sequences or raise a 503 APIError (with Retry-After).

        A request is refused when the waiting queue would exceed the limit; a request larger
        than the limit alone is still admitted into an empty queue, so it is not refused
        forever, unless it could not even fit running batch plus queue (400: retrying is futile).
        """
        if self.draining:
            raise unavailable("The server is shutting down.", code="shutting_down")
        most = self.engine.config.scheduler.max_num_seqs + self.max_waiting_requests
        if num_seqs > most:
            raise bad_request(f"The request asks for {num_seqs} sequences (prompts x n); this server "
                              f"takes at most {most} at once.", param="n")
        waiting = self.num_waiting_estimate
        if waiting > 0 and waiting + num_seqs > self.max_waiting_requests:
            raise unavailable(
                f"The server is overloaded: {waiting} sequences are waiting (limit "
                f"{self.max_waiting_requests}). Please retry later.",
                code="engine_overloaded",
            )
        self.num_inflight_seqs += num_seqs
        return Reservation(self, num_seqs)


class Reservation:
    """Sequences admitted for one HTTP request; released as their streams end."""

    def __init__(self, admission: Admission, num_seqs: int) -> None:
        self._admission = admission
        self._remaining = num_seqs

    def release(self, num_seqs: int) -> None:
        num_seqs = min(num_seqs, self._remaining)
        self._remaining -= num_seqs
        self._admission.num_inflight_seqs -= num_seqs

    def release_all(self) -> None:
        """Idempotent: whatever the streams did not release themselves."""
        self.release(self._remaining)
