"""Typed hand-offs between scheduler, runner and front ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step. The list fields are references, not copies."""

    request_id: str
    token_ids: list[int]  # tokens whose K/V are computed this step (prefill chunk or last sampled token)
    num_computed_tokens: int  # position of token_ids[0]; tokens before it are in the cache
    block_ids: list[int]  # the request's whole block table, covering every token through this step
    new_block_ids: list[int]  # blocks allocated this step (the runner clears them before use)
    needs_sample: bool  # this chunk reaches the last known token: sample the next one
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)
    matcher: Any = None  # structured output: the request's grammar matcher (read, not advanced)
    # Prompt positions of this chunk whose next prompt token should be scored
    # (prompt_logprobs): how many (0 when not requested) and the first one.
    num_prompt_logprob_positions: int = 0
    first_prompt_logprob_position: int = 0
    # Speculative decoding (decodes only): room the scheduler allotted for proposals, and
    # the proposals a proposer put there (at most that many) to verify after token_ids.
    num_draft_slots: int = 0
    draft_token_ids: list[int] = field(default_factory=list)
    # [len(draft_token_ids), vocab] the distributions a draft model sampled them from;
    # None: each proposal is a point mass (ngram, greedy drafts)
    draft_probs: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        """One known token to compute (plus any proposals), not a prefill chunk."""
        return len(self.token_ids) == 1

    @property
    def num_query_tokens(self) -> int:
        """Tokens the model runs this step: the known ones and the proposals."""
        return len(self.token_ids) + len(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    """What to compute in one engine step."""

    scheduled: list[ScheduledRequest]
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # finished or aborted since the last step

    @property
    def released_req_ids(self) -> list[str]:
        """Requests whose blocks were freed: what a runner keeps for them is stale."""
        return self.preempted_req_ids + self.finished_req_ids


@dataclass
class ModelRunnerOutput:
    """What the runner computed in one step (all on the host)."""

    # request id -> new tokens, for requests that sampled: one, or with proposals the kept
    # ones and the target's next
    sampled: dict[str, list[int]]
    logprobs: dict  # request id -> [SampledLogprobs] of each new token (when asked)
    prompt_logprobs: dict  # request id -> [SampledLogprobs], one per scored prompt position


@dataclass
class EngineCoreOutput:
    """New results of one request after a step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list | None = None  # [SampledLogprobs] per new token, when asked for
    new_prompt_logprobs: list | None = None  # [SampledLogprobs] per newly scored prompt position
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() when first scheduled


@dataclass
class SchedulerStats:
    """Snapshot for metrics and logs; counters are cumulative since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    spec_decode: SpecDecodeStats | None = None  # when speculative decoding is on


@dataclass
class SpecDecodeStats:
    """Speculative decoding counters, cumulative (vLLM's spec_decode_* metrics)."""

    num_drafts: int = 0  # verifications: (request, step) pairs that had proposals
    num_draft_tokens: int = 0  # tokens proposed
    num_accepted_tokens: int = 0  # proposals kept
    # [num_speculative_tokens]: how often the proposal at each position was kept
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_pos))
