"""The load generator: offers a workload to an endpoint open-loop or closed-loop, bounded.

Open loop: requests are sent at gamma/Poisson arrival times whatever the server does.
Closed loop: `max_concurrency` requests in flight, the next sent as soon as one finishes
(request rate inf). Both at once: arrivals queue for a free slot, as in vLLM; a request's
clock starts when it is sent, so slot waiting is not in its latency.

The run stops by itself: after `num_prompts` sends and/or when `duration_s` has passed
(no new sends; in-flight requests finish, bounded by the request timeout). Ctrl-C stops
sending, cancels what is in flight (those become "incomplete") and returns what was measured.

Around the measured phase the server's speculative decoding counters are read from its
/metrics, when it has them, so the run can report acceptance over exactly its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from tokenmill.bench.arrivals import iter_arrival_offsets
from tokenmill.bench.client import (
    Clock,
    EndpointSpec,
    fetch_spec_decode_counts,
    http_client,
    send_request,
    split_base_url,
)
from tokenmill.bench.schema import LoadSpec, RequestSample, RequestSpec
from tokenmill.bench.spec_counts import spec_decode_delta


@dataclass
class LoadResult:
    """Raw outcome of one run; metrics.summarize turns it into numbers."""

    samples: list[RequestSample]  # measured requests in send order
    duration_s: float  # first send slot to last finish (or to the interruption)
    interrupted: bool  # stopped by Ctrl-C (or the caller's stop event)
    num_warmup_errors: int
    # The server's speculative decoding counters over the measured requests
    # (SpecDecodeCounts.to_summary()); None when it exposes none.
    spec_decode: dict[str, Any] | None = None


async def run_load(
    endpoint: EndpointSpec,
    requests: Iterator[RequestSpec],
    warmups: Iterator[RequestSpec],
    load: LoadSpec,
    count_tokens: Callable[[str], int] | None = None,
    show_progress: bool = True,
    client: httpx.AsyncClient | None = None,
    stop: asyncio.Event | None = None,
    clock: Clock = time.perf_counter,
) -> LoadResult:
    """Run one bounded load against an endpoint.

    Args:
        endpoint: where to send.
        requests: measured prompts (endless iterators are fine; the load bounds the run).
        warmups: prompts for the warm-up phase (load.num_warmups of them are sent).
        load: rate, concurrency and bounds.
        count_tokens: re-tokenizer for servers without usage; None counts chunks.
        show_progress: draw a rich progress bar on stderr.
        client: reuse an HTTP client (tests pass one with a mock transport).
        stop: set it to stop early; Ctrl-C sets it when running in the main thread.
        clock: seconds; tests pass a virtual clock.

    Returns:
        LoadResult with every measured request, in send order.
    """
    stop = stop or asyncio.Event()
    own_client = client is None
    client = client or http_client(load.max_concurrency, endpoint.request_timeout_s)
    send = functools.partial(_send_within_timeout, client, endpoint, count_tokens=count_tokens, clock=clock)
    with _sigint_sets(stop):
        try:
            num_warmup_errors = await _warm_up(send, warmups, load)
            # Counters read after the warm-ups and after the drain cover the measured
            # requests only (outside the timed span).
            root = split_base_url(endpoint.api_base)[0]
            before = await fetch_spec_decode_counts(client, root, endpoint.model)
            result = await _measure(send, requests, load, show_progress, stop, clock, num_warmup_errors)
            if before is not None:
                result.spec_decode = spec_decode_delta(
                    before, await fetch_spec_decode_counts(client, root, endpoint.model))
            return result
        finally:
            if own_client:
                await client.aclose()


Send = Callable[[RequestSpec, RequestSample], Awaitable[None]]


async def _send_within_timeout(client: httpx.AsyncClient, endpoint: EndpointSpec, req: RequestSpec,
                               sample: RequestSample, count_tokens: Callable[[str], int] | None,
                               clock: Clock) -> None:
    """send_request, cut off after the endpoint's request timeout (the sample then failed)."""
    try:
        await asyncio.wait_for(send_request(client, endpoint, req, sample, count_tokens, clock),
                               endpoint.request_timeout_s)
    except asyncio.TimeoutError:
        sample.status, sample.error = "error", f"timed out after {endpoint.request_timeout_s:g} s"


@contextlib.contextmanager
def _sigint_sets(stop: asyncio.Event):
    """Route Ctrl-C to `stop` for the duration of a run (main thread only)."""
    loop = asyncio.get_running_loop()
    installed = False
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
            installed = True
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


async def _warm_up(send: Send, warmups: Iterator[RequestSpec], load: LoadSpec) -> int:
    if load.num_warmups == 0:
        return 0
    width = min(load.num_warmups, load.max_concurrency or load.num_warmups)
    sem = asyncio.Semaphore(width)

    async def one(req: RequestSpec) -> str:
        async with sem:
            sample = RequestSample(index=req.index, start_s=0.0)
            await send(req, sample)
            return sample.status

    statuses = await asyncio.gather(*(one(next(warmups)) for _ in range(load.num_warmups)))
    return sum(s != "ok" for s in statuses)


async def _measure(send: Send, requests: Iterator[RequestSpec], load: LoadSpec, show_progress: bool,
                   stop: asyncio.Event, clock: Clock, num_warmup_errors: int) -> LoadResult:
    from tokenmill.bench.progress import RunProgress

    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    samples: list[RequestSample] = []
    tasks: list[asyncio.Task] = []
    arrivals = iter_arrival_offsets(load.request_rate, load.burstiness, load.seed)
    run_start = clock()
    deadline = run_start + load.duration_s if load.duration_s else None
    progress = RunProgress(load.num_prompts, load.duration_s, enabled=show_progress)

    async def one(req: RequestSpec, sample: RequestSample) -> None:
        try:
            await send(req, sample)
        finally:
            if sem:
                sem.release()
            progress.advance(sample.status)

    async def wait(seconds: float) -> bool:
        """Sleep unless stopped; True if stopped."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    with progress:
        while not stop.is_set() and (load.num_prompts is None or len(samples) < load.num_prompts):
            # Made before waiting for its send time and slot: tokenizing never delays a send.
            req = next(requests)
            send_at = run_start + next(arrivals)
            if deadline is not None and send_at >= deadline:
                await wait(deadline - clock())
                break
            if await wait(send_at - clock()):
                break
            if sem and not await _acquire(sem, stop, None if deadline is None else deadline - clock()):
                break
            sample = RequestSample(index=req.index, start_s=clock() - run_start)
            samples.append(sample)
            tasks.append(asyncio.create_task(one(req, sample)))
            progress.sent(sample.start_s)
        stopper = asyncio.create_task(stop.wait())
        while not stop.is_set():  # drain: in-flight requests finish unless Ctrl-C
            running = [t for t in tasks if not t.done()]
            if not running:
                break
            await asyncio.wait([*running, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for t in tasks:
            t.cancel()  # only still-running ones are affected: Ctrl-C cuts them short
        await asyncio.gather(*tasks, return_exceptions=True)
    return LoadResult(samples, clock() - run_start, stop.is_set(), num_warmup_errors)


async def _acquire(sem: asyncio.Semaphore, stop: asyncio.Event, timeout_s: float | None) -> bool:
    """Take a concurrency slot unless stopped or out of time first."""
    if timeout_s is not None and timeout_s <= 0:
        return False
    acquire = asyncio.create_task(sem.acquire())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([acquire, stopper], timeout=timeout_s,
                                 return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if acquire in done and not stop.is_set():
        return True
    if acquire in done:
        sem.release()
    else:
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        if acquire.done() and not acquire.cancelled():
            sem.release()  # it won the race with the cancellation
    return False
