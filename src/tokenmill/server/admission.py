"""Admission: the server holds at most max_num_seqs running + max_waiting_requests waiting
sequences, and refuses work beyond that instead of piling it up.

The engine's own queue has no bound, so the server counts the sequences it has handed over
and not yet seen finish (a request counts n per prompt). The engine runs up to
max_num_seqs of them; the rest wait. The count is the server's own, updated as each request
is admitted, so a burst is admitted up to exactly the capacity: the engine's running count
(`engine.stats`) lags by a step and would make a burst look like a full queue.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.server.errors import bad_request, unavailable


class Admission:
    """Owns the count of in-flight engine sequences. Event-loop thread only."""

    def __init__(self, max_num_seqs: int, max_waiting_requests: int, is_draining: Callable[[], bool],
                 on_reject: Callable[[str], None] = lambda reason: None) -> None:
        """Args:
            on_reject: called with the reason ("capacity", "too_large", "shutting_down") of
                each refusal, for the metrics.
        """
        self.max_num_seqs = max_num_seqs
        self.max_waiting_requests = max_waiting_requests
        self.capacity = max_num_seqs + max_waiting_requests
        self.num_inflight_seqs = 0
        self._is_draining = is_draining
        self._on_reject = on_reject

    def check_size(self, num_seqs: int) -> None:
        """400 for a request larger than the whole capacity (retrying cannot help). Checked
        before its prompts are tokenized, as well as on admission."""
        if num_seqs > self.capacity:
            self._on_reject("too_large")
            raise bad_request(f"The request asks for {num_seqs} sequences (prompts x n); this server "
                              f"holds at most {self.capacity} at once ({self.max_num_seqs} running + "
                              f"{self.max_waiting_requests} waiting).", param="n")

    def reserve(self, num_seqs: int) -> Reservation:
        """Admit `num_seqs` new sequences, or raise 503 (with Retry-After) when the server
        would then hold more than its capacity, 400 when the request alone exceeds it."""
        if self._is_draining():
            self._on_reject("shutting_down")
            raise unavailable("The server is shutting down.", code="shutting_down")
        self.check_size(num_seqs)
        if self.num_inflight_seqs + num_seqs > self.capacity:
            self._on_reject("capacity")
            raise unavailable(
                f"The server is full: it holds {self.num_inflight_seqs} unfinished sequences and its "
                f"capacity is {self.capacity} ({self.max_num_seqs} running + {self.max_waiting_requests} "
                f"waiting); this request needs {num_seqs}. Please retry later.",
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
