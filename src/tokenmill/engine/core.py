"""EngineCore: the step loop. Knows token ids, never text or HTTP."""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import EngineCoreRequest, Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import EngineCoreOutput, SchedulerStats
from tokenmill.model.runner import ModelRunner
from tokenmill.spec_decode.proposers import DraftModelProposer, NgramProposer

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config)
        bs = config.cache.block_size
        self.num_kv_blocks = self.runner.num_blocks
        capacity = self.num_kv_blocks * bs
        if capacity < config.scheduler.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.num_kv_blocks} blocks of {bs}), fewer "
                f"than max_model_len={config.scheduler.max_model_len}; raise the KV budget or "
                "lower max_model_len."
            )
        self.kv = KVCacheManager(self.num_kv_blocks, bs, config.cache.enable_prefix_caching)
        spec = config.speculative
        self.scheduler = Scheduler(config.scheduler, self.kv, spec)
        self.proposer: NgramProposer | DraftModelProposer | None = None
        if spec is not None:
            self.proposer = (NgramProposer(spec) if spec.method == "ngram"
                             else DraftModelProposer(config, self.num_kv_blocks))
            logger.info("speculative decoding: %s, up to %d tokens per step", spec.method,
                        spec.num_speculative_tokens)
        logger.info(
            "KV cache holds %d tokens (%d blocks of %d); max_model_len=%d",
            capacity, self.num_kv_blocks, bs, config.scheduler.max_model_len,
        )

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.config.cache.block_size

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError if the prompt cannot be served (empty, too long, bad ids)."""
        max_len = self.config.scheduler.max_model_len
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty; at least one token is needed.")
        if num_prompt >= max_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens but the model's context length "
                f"(max_model_len) is {max_len}; at least one token must remain to generate."
            )
        vocab = self.config.model.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is out of range for vocab size {vocab}.")

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a tokenized request whose prompt passed `validate_prompt`.

        The front ends validate once per user request, before any of its n samples is
        queued (and, for the server, on the event loop rather than the engine thread).
        """
        room = self.config.scheduler.max_model_len - len(req.prompt_token_ids)
        max_tokens = room if req.params.max_tokens is None else min(req.params.max_tokens, room)
        self.scheduler.add_request(Request(req, max_tokens, self.config.cache.block_size))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> list[EngineCoreOutput]:
        """Schedule -> run the model once -> advance requests. Returns what is new."""
        if not self.scheduler.has_unfinished_requests():
            return []
        sched = self.scheduler.schedule()
        if self.proposer is None:
            if not sched.scheduled:
                self.runner.forget_requests(sched.released_req_ids)  # e.g. a request that preempted itself
                return []
            return self.scheduler.update_from_output(sched, self.runner.execute(sched))
        self.proposer.propose(sched)  # even with nothing scheduled: it must see every preemption
        if not sched.scheduled:
            self.runner.forget_requests(sched.released_req_ids)
            return []
        start = time.perf_counter()
        result = self.runner.execute(sched)
        if self.proposer.last_step_s is not None:
            self.scheduler.spec_policy.observe_step_times(self.proposer.last_step_s, time.perf_counter() - start)
        return self.scheduler.update_from_output(sched, result)
