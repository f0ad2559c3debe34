"""Prompt text -> token ids without stalling the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tokenmill.tokenizer import Tokenizer

# Below this many characters encoding takes at most about half a millisecond: do it inline.
# Above, hand it to a thread via encode_batch, which (unlike encode) releases the GIL, so the
# event loop keeps streaming while a long prompt is tokenized. Measured by
# tests/server/bench_encode_gil.py (docs/server.md, "Concurrency").
INLINE_ENCODE_CHARS = 2000


class PromptEncoder:
    """Owns the one tokenizer thread that all handlers of an app share."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-tokenize")

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) < INLINE_ENCODE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        backend = self.tokenizer.backend
        encodings = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: backend.encode_batch([text], add_special_tokens=add_special_tokens)
        )
        return encodings[0].ids

    def shutdown(self) -> None:
        """Stop the thread once the app stops (an encode still running finishes first)."""
        self._pool.shutdown(wait=False)
