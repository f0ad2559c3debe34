"""The perplexity protocol: how a text becomes the scored windows (llama-perplexity's).

1. The whole text is tokenized once, with the tokenizer's special tokens (a BOS in front when
   the tokenizer adds one).
2. It is cut into non-overlapping windows of `ctx_size` tokens (stride = ctx_size); the tail
   that does not fill a window is dropped. `num_chunks` bounds how many windows are used
   (the first ones).
3. When the tokenizer adds BOS, each window's first token is replaced by BOS, so every
   window starts the way a document does.
4. Each window is one independent sequence (nothing carried over). The logits at positions
   `ctx_size // 2 .. ctx_size - 2` are scored against the next token: the first half of
   every window only gives context, so no scored token sees fewer than ctx_size / 2
   tokens before it. A window scores `ctx_size - 1 - ctx_size // 2` tokens.

Two runs are comparable (PPL ratio, KL divergence, verdicts) only when their windows are
identical; `Windows.fingerprint` says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_CTX_SIZE = 512  # llama-perplexity's customary -c 512


@dataclass(frozen=True)
class Protocol:
    """What is scored: window length and how many windows."""

    ctx_size: int = DEFAULT_CTX_SIZE  # tokens per window = stride
    num_chunks: int | None = None  # windows to score (the first ones); None: all that fit

    def __post_init__(self) -> None:
        if self.ctx_size < 4:
            raise ValueError(f"ctx_size must be at least 4 tokens, got {self.ctx_size}")
        if self.num_chunks is not None and self.num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {self.num_chunks}")

    @property
    def first_scored_position(self) -> int:
        """Position of the first logits row that is scored (it predicts the next token)."""
        return self.ctx_size // 2

    @property
    def num_scored_per_chunk(self) -> int:
        return self.ctx_size - 1 - self.first_scored_position

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Windows:
    """The token windows a run scores, exactly as fed to the model."""

    protocol: Protocol
    token_ids: np.ndarray  # [num_chunks, ctx_size] int64, BOS already substituted
    bos_token_id: int | None  # substituted at position 0 of each window; None: not substituted
    num_text_tokens: int  # tokens of the whole text (incl. a leading BOS)

    @property
    def num_chunks(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def targets(self) -> np.ndarray:
        """[num_chunks, num_scored_per_chunk]: the tokens the scored positions predict."""
        return self.token_ids[:, self.protocol.first_scored_position + 1:]

    @property
    def num_scored(self) -> int:
        return self.num_chunks * self.protocol.num_scored_per_chunk

    @property
    def fingerprint(self) -> str:
        """Short hash of the windows' token ids: equal fingerprints, comparable runs."""
        return hashlib.sha256(np.ascontiguousarray(self.token_ids, dtype=np.int64).tobytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The protocol as stored with a run and in a logits file."""
        return {
            **self.protocol.to_dict(),
            "num_chunks": self.num_chunks,
            "first_scored_position": self.protocol.first_scored_position,
            "num_scored_per_chunk": self.protocol.num_scored_per_chunk,
            "bos_token_id": self.bos_token_id,
            "num_text_tokens": self.num_text_tokens,
            "fingerprint": self.fingerprint,
        }


def make_windows(text_token_ids: list[int], protocol: Protocol, bos_token_id: int | None) -> Windows:
    """Cut a tokenized text into the protocol's windows.

    Args:
        text_token_ids: the whole text, tokenized with special tokens (as the model's
            tokenizer encodes a document).
        protocol: window length and count.
        bos_token_id: the BOS id when the tokenizer adds BOS (then every window starts with
            it); None otherwise.

    Returns:
        The windows.

    Raises:
        ValueError: the text does not fill one window.
    """
    n = protocol.ctx_size
    available = len(text_token_ids) // n
    if available == 0:
        raise ValueError(f"the text has {len(text_token_ids)} tokens, fewer than one window of "
                         f"--ctx-size {n}; use a longer text or a smaller --ctx-size.")
    num_chunks = available if protocol.num_chunks is None else min(protocol.num_chunks, available)
    ids = np.asarray(text_token_ids[: num_chunks * n], dtype=np.int64).reshape(num_chunks, n)
    if bos_token_id is not None:
        ids[:, 0] = bos_token_id
    return Windows(Protocol(n, num_chunks), ids, bos_token_id, len(text_token_ids))


def windows_for_text(tokenizer: Any, text: str, protocol: Protocol) -> Windows:
    """Tokenize `text` with a tokenmill Tokenizer (or anything with encode/bos_token_id/
    adds_bos_token) and cut it into windows."""
    bos = tokenizer.bos_token_id if tokenizer.adds_bos_token else None
    return make_windows(tokenizer.encode(text, add_special_tokens=True), protocol, bos)
