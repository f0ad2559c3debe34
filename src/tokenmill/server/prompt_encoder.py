"""Prompt text -> token ids without stalling the event loop or other requests.

Three lanes by size, so that no prompt waits behind a much longer one:
- under INLINE_ENCODE_CHARS: encoded on the event loop (at most about a millisecond);
- under LONG_ENCODE_CHARS: one thread (at most ~100 ms each);
- longer: another thread. Only /tokenize takes text this long on most models: a prompt for
  generation is refused before this point when it cannot fit the context (limits.py).
The threads call `encode_batch`, which (unlike `encode`) releases the GIL, so the event loop
keeps streaming meanwhile. Measured by tests/server/bench_encode_gil.py (docs/server.md,
"Concurrency").

Cancellation: a request whose client leaves cancels its await; an encode still queued then
never runs. One already running finishes (the tokenizer cannot be interrupted) and its
result is dropped; the limits bound how long that can take.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tokenmill.tokenizer import Tokenizer

INLINE_ENCODE_CHARS = 2000
LONG_ENCODE_CHARS = 100_000


class PromptEncoder:
    """Owns the tokenizer threads that all handlers of an app share."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._short = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-tokenize")
        self._long = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-tokenize-long")
        # Encodes that ran on each lane's thread (not cancelled while queued); each count has
        # one writer, its lane's thread. For tests and benches.
        self.num_encodes = {"short": 0, "long": 0}

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) < INLINE_ENCODE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        backend = self.tokenizer.backend

        lane = "short" if len(text) < LONG_ENCODE_CHARS else "long"

        def run() -> list[int]:
            self.num_encodes[lane] += 1
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

        pool = self._short if lane == "short" else self._long
        return await asyncio.get_running_loop().run_in_executor(pool, run)

    def shutdown(self) -> None:
        """Stop the threads once the app stops (an encode still running finishes first)."""
        for pool in (self._short, self._long):
            pool.shutdown(wait=False, cancel_futures=True)
