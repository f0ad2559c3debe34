"""Scheduler: owns the waiting and running queues and decides each step's work.

Every request is just (tokens known, tokens computed). Each step, running requests
get their next tokens first (decodes, or the rest of a chunked prefill), then waiting
requests are admitted FCFS with as many prompt tokens as the budget allows. When KV
blocks run out, the newest running request is preempted: its blocks are freed and it
goes back to the front of the queue to recompute later (its outputs are kept).

With speculative decoding a decode may also get room for a few proposed tokens (as many
as `SpecPolicy` finds worth it), never at the cost of preempting anyone; after the step
it advances past the proposals the target kept, and the blocks it no longer needs go back.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from tokenmill.config import SchedulerConfig, SpeculativeConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler_output import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
    SpecDecodeStats,
)
from tokenmill.spec_decode.policy import SpecPolicy

logger = logging.getLogger("tokenmill.engine")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.config = config
        self.kv = kv
        self.spec_policy = SpecPolicy(speculative) if speculative else None
        self.spec_stats = SpecDecodeStats(accepted_per_pos=[0] * speculative.num_speculative_tokens) \
            if speculative else None
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: newest last
        self.num_preemptions = 0
        # Requests finished (or aborted) since the last schedule(): the runner drops what it
        # keeps per request (vLLM's finished_req_ids), in case an id comes back.
        self._finished_ids: list[str] = []

    # -- queue management -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Drop requests wherever they are and free their blocks now."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            spec_decode=self.spec_stats.copy() if self.spec_stats else None,
        )

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while (new_blocks := self.kv.allocate_slots(req, num_new)) is None:
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # it preempted itself; everything after it is gone too
            scheduled.append(self._make_scheduled(req, num_new, new_blocks))
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if preempted or (self.kv.enable_caching and self._waits_for_leader(req)):
                break  # don't re-admit in the step that had to preempt; keep FCFS order
            cached_ids, num_cached = self.kv.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_cached, budget)
            new_blocks = self.kv.allocate_slots(req, num_new, cached_ids)
            if new_blocks is None:
                break
            self.kv.record_prefix_lookup(req.num_tokens, num_cached)
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._make_scheduled(req, num_new, new_blocks))
            budget -= num_new

        if self.spec_policy is not None:
            self._allot_proposals(scheduled, budget)
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            preempted_req_ids=preempted,
            finished_req_ids=finished,
        )

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance each scheduled request past this step; return what is new per request."""
        outputs: list[EngineCoreOutput] = []
        for sr in sched.scheduled:
            req = self.requests[sr.request_id]
            req.num_computed_tokens += len(sr.token_ids)
            self.kv.cache_blocks(req)
            out = EngineCoreOutput(
                req.request_id,
                [],
                num_cached_tokens=req.num_cached_tokens,
                first_scheduled_time=req.first_scheduled_time,
            )
            out.new_prompt_logprobs = result.prompt_logprobs.get(req.request_id)
            if sr.needs_sample:
                status = None
                if req.max_tokens > 0:
                    tokens = result.sampled[req.request_id]
                    if sr.num_draft_slots:
                        self._observe_proposals(req, sr, len(tokens) - 1)
                    logprobs = result.logprobs.get(req.request_id)
                    for n, token in enumerate(tokens, 1):
                        req.append_output_token(token)
                        # Each kept proposal's K/V was computed this step; the last token's is not.
                        req.num_computed_tokens += n > 1
                        if (status := self._check_stop(req)) is not None:
                            break
                    out.new_token_ids = tokens[:n]
                    if logprobs is not None:
                        out.new_logprobs = logprobs[:n]
                    if sr.num_draft_slots:
                        self.kv.cache_blocks(req)  # the kept proposals may fill blocks
                        self.kv.free_unused_blocks(req)  # slots of rejected proposals
                else:
                    status = self._check_stop(req)
                if status is not None:
                    self.running.remove(req)
                    self._finish(req, status)
                    out.finish_reason, out.stop_reason = status.value, req.stop_reason
            if out.new_token_ids or out.finish_reason or out.new_prompt_logprobs:
                outputs.append(out)
        return outputs

    # -- helpers --------------------------------------------------------------------------
    def _allot_proposals(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        """Room for proposals after each decode's token, last: from the blocks and the budget
        that every running request's own step and the admissions left over, so speculation
        never preempts or delays anyone."""
        for sr in scheduled:
            req = self.requests[sr.request_id]
            if budget <= 0 or not sr.is_decode or req.num_tokens - req.num_computed_tokens != 1:
                continue
            # The step yields up to num_drafts + 1 tokens: leave room for them in the output,
            # the context and the step's token budget.
            room = min(req.max_tokens - req.num_output_tokens - 1, self.config.max_model_len - req.num_tokens - 1,
                       budget)
            num_drafts = self.spec_policy.num_proposals(req.spec_acceptance, room, len(self.running))
            if num_drafts and (new_blocks := self.kv.allocate_slots(req, 1 + num_drafts)) is not None:
                sr.num_draft_slots = num_drafts
                sr.new_block_ids = sr.new_block_ids + new_blocks
                sr.block_ids = self.kv.block_ids(req.request_id)  # allocation made a new list
                budget -= num_drafts

    def _observe_proposals(self, req: Request, sr: ScheduledRequest, num_accepted: int) -> None:
        num_proposed = len(sr.draft_token_ids)
        if num_proposed:  # the proposer may have found nothing to propose
            req.spec_acceptance.observe(num_proposed, num_accepted)
            self.spec_stats.observe(num_proposed, num_accepted)

    def _make_scheduled(self, req: Request, num_new: int, new_block_ids: list[int]) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        needs_sample = end == req.num_tokens
        num_scored = first_scored = 0
        if req.params.prompt_logprobs is not None:
            # Position p scores prompt token p + 1; the last prompt position predicts output.
            # After a preemption the prompt is recomputed: score only what is not yet scored.
            first_scored = max(start, req.num_prompt_positions_scored)
            num_scored = max(0, min(end, req.num_prompt_tokens - 1) - first_scored)
            req.num_prompt_positions_scored = first_scored + num_scored
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start:end],
            num_computed_tokens=start,
            block_ids=self.kv.block_ids(req.request_id),
            new_block_ids=new_block_ids,
            needs_sample=needs_sample,
            params=req.params,
            generator=req.generator,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            matcher=req.matcher,
            num_prompt_logprob_positions=num_scored,
            first_prompt_logprob_position=first_scored,
        )

    def _waits_for_leader(self, req: Request) -> bool:
        leader = self.requests.get(req.group_leader_id) if req.group_leader_id else None
        return leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens

    def _check_stop(self, req: Request) -> RequestStatus | None:
        params = req.params
        if req.max_tokens == 0:
            return RequestStatus.FINISHED_LENGTH
        # First: an output whose grammar failed is not valid, whichever token came last.
        error = req.grammar_error
        if error is not None:  # never a stuck slot: the request ends, saying why
            logger.warning("request %s: structured output stopped at a grammar dead end: %s",
                           req.request_id, " ".join(error.split())[:300])
            req.stop_reason = "grammar_dead_end"
            return RequestStatus.FINISHED_ABORTED
        last = req.output_token_ids[-1]
        # all_stop_token_ids = eos ids (unless ignore_eos) + stop_token_ids; the sampler
        # already masks them below min_tokens, this guard keeps that true here too.
        if req.num_output_tokens >= params.min_tokens and last in params.all_stop_token_ids:
            req.stop_reason = last if last in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        if req.grammar_finished:  # e.g. the end token under ignore_eos
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)
        self._finished_ids.append(req.request_id)
        del self.requests[req.request_id]
