"""A step's token masks, applied to the logits rows of the constrained requests only.

The masks depend only on what each request has output so far, so they are computed while
the forward pass runs (`TokenMaskWorker`); the step then only applies them (the CPU kernel
`apply_token_bitmask`, or a byte lookup without the kernels).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from tokenmill.model import kernels

# Byte -> what its 8 bits add to the logits (0 allowed, -inf forbidden), least significant
# bit first: llguidance's masks are little-endian words in which token t is bit t % 32 of
# word t // 32, so byte b holds tokens 8b..8b+7. The fallback without the CPU kernels (one
# numpy take and one add: 3.7 ms for 64 rows of 49,152 tokens; masked_fill with a boolean
# mask took 8.7 ms for the fill alone).
_PENALTY_OF_BYTE = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0.0, -np.inf).astype(np.float32)


@dataclass(frozen=True)
class TokenMasks:
    """A step's grammar masks: `bitmask[i]` (llguidance's words) applies to logits row `rows[i]`."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32


def token_masks(matchers: list[Any], vocab_size: int, executor: llguidance.LLExecutor) -> TokenMasks | None:
    """The masks of the rows that have a llguidance matcher (None for unconstrained rows);
    None when no row has one.

    Args:
        vocab_size: the width of the model's logits (the masks', rounded up to words).
        executor: llguidance's thread pool: the masks computed in parallel, outside the GIL,
            written in place (64 masks of states already seen: 0.12 ms on 2 threads, where
            a compute_bitmask call per matcher took 0.7 ms).
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    words = -(-vocab_size // 32)  # as llguidance's helpers size them
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)
    executor.unsafe_compute_mask_ptr([(matchers[r], i) for i, r in enumerate(rows)], bitmask.data_ptr(),
                                     words * 4, len(rows))
    return TokenMasks(rows, bitmask)


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks | None) -> None:
    """In place: each constrained row gets -inf where its grammar forbids the token.

    Args:
        logits: [R, V] float32, one row per sampled request.
    """
    if masks is None:
        return
    ops = kernels.for_tensor(logits)
    if ops is not None and logits.dtype == torch.float32 and logits.is_contiguous():
        ops.apply_token_bitmask(logits, masks.bitmask, torch.tensor(masks.rows, dtype=torch.long))
        return
    packed = masks.bitmask.numpy().view(np.uint8).reshape(-1)
    penalty = torch.from_numpy(np.take(_PENALTY_OF_BYTE, packed, axis=0)).view(len(masks.rows), -1)
    penalty = penalty[:, : logits.shape[1]].to(logits.device)  # [n, V]
    if len(masks.rows) == logits.shape[0]:  # every row constrained
        logits.add_(penalty)
    else:
        logits.index_add_(0, torch.tensor(masks.rows, device=logits.device), penalty)


def spare_cpus() -> int:
    """CPUs this process may run on beyond the threads torch's ops use."""
    return len(os.sched_getaffinity(0)) - torch.get_num_threads()


class TokenMaskWorker:
    """Computes each step's masks on llguidance's threads, alongside the forward pass.

    Measured on 2 cores that torch's OpenMP threads both use (docs/structured_output.md):
    with the masks computed by llguidance's executor and applied by the kernel, computing
    them beside the forward pass decoded 64 constrained streams at 0.95x of free ones,
    computing them first at 0.93x. An earlier version that also built a dense 0/-inf
    penalty on the thread (4 ms per step) slowed the forward pass by more than that: a
    descheduled OpenMP thread leaves the other spinning at the next barrier.
    """

    def __init__(self, vocab_size: int, overlap: bool = True) -> None:
        """Args:
            vocab_size: the width of the model's logits.
            overlap: compute beside the forward pass (on the CPUs torch's threads leave
                free, at least one); False computes them at the start of the step, on the
                CPUs the forward pass is about to use (scripts/bench_structured.py
                measures both).
        """
        self.vocab_size = vocab_size
        threads = max(1, spare_cpus()) if overlap else torch.get_num_threads()
        self._executor = llguidance.LLExecutor(num_threads=threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-masks") if overlap else None

    def start(self, matchers: list[Any]) -> Future[TokenMasks | None] | None:
        """Begin the masks of a step's sampled rows; None when none is constrained. The
        matchers must not advance until the result is taken."""
        if all(m is None for m in matchers):
            return None
        if self._pool is not None:
            return self._pool.submit(token_masks, matchers, self.vocab_size, self._executor)
        done: Future[TokenMasks | None] = Future()
        done.set_result(token_masks(matchers, self.vocab_size, self._executor))
        return done
