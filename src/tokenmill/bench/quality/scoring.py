"""Collects what every scored position measured, whichever backend produced the rows.

Backends (the engine, transformers, a server) hand over rows in any order and in pieces (a
window may be prefilled over several engine steps); the Accumulator keeps only the scored
positions, turns each into its NLL (and KL divergence / top-1 agreement when a reference is
given; written to the --save-logits folder when asked) and says when a window is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.bench.quality.distributions import (
    ListedRows,
    LogitsFile,
    LogitsWriter,
    kl_against_full,
    kl_against_listed,
)
from tokenmill.bench.quality.protocol import Windows


@dataclass
class ScoredPositions:
    """Per scored position, in window order ([P] = num_chunks * num_scored_per_chunk)."""

    nll: np.ndarray  # [P] float64: -log p(the token that follows)
    kld: np.ndarray | None = None  # [P] KL_k(reference || this run)
    same_top: np.ndarray | None = None  # [P] int8: 1 same most likely token as the reference, 0 not, -1 unknown
    ref_nll: np.ndarray | None = None  # [P] the reference's NLL at the same positions


def check_reference(reference: LogitsFile, windows: Windows) -> None:
    """Raise ValueError unless the reference scored exactly these windows."""
    ref_protocol = reference.meta.get("protocol", {})
    if ref_protocol.get("fingerprint") != windows.fingerprint:
        raise ValueError(
            "the reference scored different token windows (fingerprint "
            f"{ref_protocol.get('fingerprint')} vs {windows.fingerprint}): use the same text, tokenizer, "
            f"--ctx-size ({ref_protocol.get('ctx_size')} vs {windows.protocol.ctx_size}) and --chunks "
            f"({ref_protocol.get('num_chunks')} vs {windows.num_chunks}).")
    if reference.num_positions != windows.num_scored:
        raise ValueError(f"the reference holds {reference.num_positions} positions, expected {windows.num_scored}")


class Accumulator:
    """Turns rows of log-probabilities into per-position measurements.

    Args:
        windows: what is scored.
        reference: a saved reference run (KL divergence, top-1 agreement, PPL ratio), or None.
        save_to: a folder to write this run's distributions to (--save-logits), or None.
    """

    def __init__(self, windows: Windows, reference: LogitsFile | None = None, save_to: str | None = None) -> None:
        if reference is not None:
            check_reference(reference, windows)
        self.windows = windows
        self.reference = reference
        self.save_to = save_to
        self.writer: LogitsWriter | None = None  # opened with the first rows (vocabulary size)
        p = windows.protocol
        self._first = p.first_scored_position
        self._per_chunk = p.num_scored_per_chunk
        total = windows.num_scored
        self._nll = np.full(total, np.nan)
        self._kld = np.full(total, np.nan) if reference is not None else None
        self._same = np.full(total, -1, dtype=np.int8) if reference is not None else None
        self._filled = np.zeros(windows.num_chunks, dtype=np.int64)

    def _span(self, first_position: int, num_rows: int) -> tuple[int, int] | None:
        """The scored positions lo..hi-1 among window rows first_position..+num_rows-1."""
        lo = max(first_position, self._first)
        hi = min(first_position + num_rows, self.windows.protocol.ctx_size - 1)
        return (lo, hi) if lo < hi else None

    def _index(self, chunk: int, position: int) -> int:
        return chunk * self._per_chunk + position - self._first

    def add_full(self, chunk: int, first_position: int, logprobs: torch.Tensor) -> bool:
        """Rows known over the whole vocabulary (the engine, transformers).

        Args:
            chunk: window index.
            first_position: window position of logprobs[0] (row i predicts token
                first_position + i + 1).
            logprobs: [num_rows, vocab] float32 log-softmax rows.

        Returns:
            True when this call completed the window.
        """
        span = self._span(first_position, logprobs.shape[0])
        if span is None:
            return False
        lo, hi = span
        rows = logprobs[lo - first_position: hi - first_position]  # [hi - lo, vocab]
        targets = torch.from_numpy(self.windows.token_ids[chunk, lo + 1: hi + 1]).to(rows.device)
        start, stop = self._index(chunk, lo), self._index(chunk, hi)
        target_logprobs = rows.gather(1, targets.view(-1, 1))[:, 0].float().cpu().numpy()
        self._nll[start:stop] = -target_logprobs.astype(np.float64)
        if self.save_to is not None:
            if self.writer is None:
                self.writer = LogitsWriter(self.save_to, self.windows.num_scored, rows.shape[1])
            self.writer.write(start, rows, target_logprobs)
        if self.reference is not None:
            self._kld[start:stop], self._same[start:stop] = kl_against_full(
                self.reference.rows(start, stop), rows)
        return self._count(chunk, hi - lo)

    def add_listed(self, chunk: int, rows: ListedRows) -> bool:
        """All scored positions of one window, known by the tokens a server listed."""
        if len(rows.target_logprobs) != self._per_chunk:
            raise ValueError(f"expected {self._per_chunk} scored positions, got {len(rows.target_logprobs)}")
        start = self._index(chunk, self._first)
        stop = start + self._per_chunk
        self._nll[start:stop] = -rows.target_logprobs.astype(np.float64)
        if self.reference is not None:
            self._kld[start:stop], self._same[start:stop] = kl_against_listed(
                self.reference.rows(start, stop), rows)
        return self._count(chunk, self._per_chunk)

    def _count(self, chunk: int, num_positions: int) -> bool:
        self._filled[chunk] += num_positions
        return bool(self._filled[chunk] == self._per_chunk)

    def chunk_nll(self, chunk: int) -> np.ndarray:
        """[num_scored_per_chunk] NLLs of one (complete) window."""
        start = chunk * self._per_chunk
        return self._nll[start: start + self._per_chunk]

    def scored_so_far(self) -> np.ndarray:
        return self._nll[~np.isnan(self._nll)]

    def result(self) -> ScoredPositions:
        """Everything measured; raises RuntimeError if a scored position is missing."""
        missing = np.flatnonzero(self._filled != self._per_chunk)
        if len(missing):
            raise RuntimeError(f"windows {missing[:5].tolist()} were not fully scored")
        ref_nll = None
        if self.reference is not None:
            ref_nll = -np.asarray(self.reference.arrays["target_logprobs"], dtype=np.float64)
        return ScoredPositions(self._nll, self._kld, self._same, ref_nll)
