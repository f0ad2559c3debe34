"""AsyncLLM: the asyncio front end the server talks to.

The engine core steps in one background thread. Why a thread and not a process: torch
releases the GIL inside its kernels, so while the engine thread computes a step, the
event loop thread is free to parse HTTP, tokenize, detokenize and write SSE; and a
thread costs no serialisation of every step's outputs. The Python parts of both still
share the GIL, which is the price (see docs/architecture.md).

Ownership: the engine thread alone touches EngineCore (scheduler, blocks, tensors); it
receives commands through a thread-safe queue. The event loop thread alone touches the
OutputProcessor and the per-request output queues; it receives raw core outputs via
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.output_processor import OutputProcessor, RequestTimes
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.scheduler_output import EngineCoreOutput, SchedulerStats
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


def _call_in_fresh_thread(fn, *args):
    """fn(*args) in a short-lived thread; its result, or its exception re-raised here.

    Why: libgomp gives every thread that runs parallel work a pool of OpenMP workers of
    its own, and once the process manages more OpenMP threads than there are cores, all
    pools stop spin-waiting between parallel regions: loading the model on the main thread
    made every later step in the engine thread ~40% slower (17 -> 24 ms at one stream).
    A pool dies with its thread, so loading here leaves the engine thread's the only one.
    """
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="tokenmill-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class AsyncLLM:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        # None with skip_tokenizer_init: token ids in, token ids out.
        self.tokenizer = tokenizer or (None if config.skip_tokenizer_init else Tokenizer.load(config.model_path))
        self.core = _call_in_fresh_thread(EngineCore, config)
        self.processor = OutputProcessor(self.tokenizer, config.model.eos_token_ids, config.model.vocab_size)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.stats: SchedulerStats = self.core.stats()  # replaced by the engine thread each step
        # Observer called on the event loop for each delivered output (metrics).
        self.on_output: list = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine_loop, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    # -- requests -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a request the engine would refuse (front-end check)."""
        self.core.validate_prompt(prompt_token_ids)

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's grammar now (then cached), on a worker thread so the event
        loop keeps streaming: StructuredOutputError if bad or slower than the compile timeout."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.processor.grammar, params)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield delta RequestOutputs until it finishes.

        If the consumer stops iterating (client disconnect, cancellation), the request is
        aborted in the engine and its KV blocks are freed before the next step.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine is not running.")
        self.validate(prompt_token_ids)
        # Off the event loop: a cache hit, unless the grammar left the cache since the check.
        grammar = await asyncio.to_thread(self.processor.grammar, params) if params.structured_outputs else None
        children = self.processor.add_request(request_id, prompt, prompt_token_ids, params, delta=True,
                                              grammar=grammar)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        leader = children[0][0]
        now = time.monotonic()
        for i, (cid, child_params, matcher) in enumerate(children):
            req = EngineCoreRequest(cid, prompt_token_ids, child_params, now, None if i == 0 else leader, matcher)
            self._commands.put(("add", req))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                out: RequestOutput = item
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def fail_all(self, error: BaseException) -> list[str]:
        """End every unfinished request's stream by raising `error` in its consumer, which
        then aborts it in the engine (the server's drain deadline). Returns their ids."""
        for q in self._queues.values():
            q.put_nowait(error)
        return list(self._queues)

    def abort(self, request_id: str) -> None:
        """Stop a request now: forget it here and free its blocks in the engine."""
        engine_ids = self.processor.engine_ids(request_id)
        self.processor.abort_request(request_id)
        if engine_ids:
            self._commands.put(("abort", engine_ids))

    # -- engine thread ------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.core.has_unfinished_requests())
                outputs = self.core.step()
                self.stats = self.core.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as e:  # surface to every waiting request, then stop
            logger.exception("engine loop crashed")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self.core.add_request(arg)  # validated in generate()
            elif kind == "abort":
                self.core.abort_requests(arg)

    # -- event loop side ------------------------------------------------------------------------
    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        results, to_abort = self.processor.process_outputs(outputs)
        if to_abort:
            self._commands.put(("abort", to_abort))
        for out, times in results:
            for observer in self.on_output:
                observer(out, times)
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        self.fail_all(EngineDeadError(f"the engine stopped: {error!r}"))


__all__ = ["AsyncLLM", "EngineDeadError", "RequestTimes"]
