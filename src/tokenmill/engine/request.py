"""Request: the engine's view of one sequence being generated."""

from __future__ import annotations

import enum
import hashlib
import time
from array import array
from dataclasses import dataclass
from typing import Any

from tokenmill.model.layers.sampler import make_generator
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.policy import AcceptanceEstimate

_ROOT_HASH = b""  # parent "hash" of a sequence's first block


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # evicted from KV; waits again and recomputes
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (self.FINISHED_STOPPED, self.FINISHED_LENGTH, self.FINISHED_ABORTED)


@dataclass
class EngineCoreRequest:
    """What a front end submits to the engine core (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    # For n>1 children: the id of the first sibling. The scheduler lets the others wait
    # until it has prefilled, so they reuse its prompt blocks through the prefix cache.
    group_leader_id: str | None = None
    # The grammar matcher of a structured output request (llguidance.LLMatcher), its own.
    matcher: Any = None


class Request:
    """Mutable per-request state. Owned by the scheduler; read by the KV cache manager."""

    def __init__(self, req: EngineCoreRequest, max_tokens: int, block_size: int) -> None:
        self.request_id = req.request_id
        self.params = req.params
        self.prompt_token_ids = req.prompt_token_ids
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.all_token_ids: list[int] = list(req.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.max_tokens = max_tokens  # resolved against the context length
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache (first schedule)
        self.num_prompt_positions_scored = 0  # prompt logprobs handed out so far (survives preemption)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.group_leader_id = req.group_leader_id
        # Structured output: the Request owns its matcher and advances it with each token;
        # the runner reads it for the token mask. It holds the output so far, so it
        # survives preemption (only the KV cache is recomputed).
        self.matcher = req.matcher
        self.block_size = block_size
        # Hashes of this request's full blocks, chained; extended as tokens arrive.
        self.block_hashes: list[bytes] = []
        self._update_block_hashes()
        # Per-request RNG so a seeded request samples the same whatever the batch.
        self.generator = make_generator(req.params.seed) if req.params.seed is not None else None
        self.arrival_time = req.arrival_time or time.monotonic()
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        self.spec_acceptance = AcceptanceEstimate()  # speculative decoding: how well proposals do

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._update_block_hashes()
        if self.matcher is not None:
            self.matcher.consume_token(token_id)  # the mask allowed it; False only on a dead end

    @property
    def grammar_finished(self) -> bool:
        """The grammar is complete: the output can take no more tokens."""
        return self.matcher is not None and self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def grammar_error(self) -> str | None:
        """Why the grammar can go no further (a dead end: a token it refused, or a parser
        limit hit), None while it is fine."""
        if self.matcher is None or not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "grammar dead end"

    def _update_block_hashes(self) -> None:
        bs = self.block_size
        num_full = len(self.all_token_ids) // bs
        while len(self.block_hashes) < num_full:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else _ROOT_HASH
            # Chained: a block's identity includes every token before it. A cryptographic
            # hash, because a collision would serve one request another's KV (vLLM moved
            # to sha256 for the same reason); one per filled block is cheap.
            tokens = array("q", self.all_token_ids[i * bs : (i + 1) * bs]).tobytes()
            self.block_hashes.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())
