"""Proposers: fill the room the scheduler gave each decode with proposed tokens."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from tokenmill.config import EngineConfig, SpeculativeConfig
from tokenmill.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from tokenmill.model.layers.sampler import SamplingState, process_logits
from tokenmill.model.runner import ModelRunner
from tokenmill.spec_decode.ngram import propose_ngram

logger = logging.getLogger(__name__)

# A draft's catch-up of at most this many tokens runs as decode rows (see propose).
_DECODE_ROWS_UP_TO = 8


class NgramProposer:
    """Prompt lookup (ngram.py): free to run, so it is tried wherever there is room."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.last_step_s = None  # proposing runs no model pass: nothing to measure

    def propose(self, sched: SchedulerOutput) -> None:
        cfg = self.config
        for r in sched.scheduled:
            if r.num_draft_slots:
                r.draft_token_ids = propose_ngram(r.prompt_token_ids + r.output_token_ids, r.num_draft_slots,
                                                  cfg.prompt_lookup_min, cfg.prompt_lookup_max)


class DraftModelProposer:
    """A smaller model with the target's vocabulary proposes, autoregressively.

    The draft keeps its own K/V tensors in the target's block ids (a block holds the same
    positions in both caches), so the scheduler's allocation, prefix sharing and rollback
    cover the draft too. It computes a request's K/V lazily, only when asked to propose:
    it catches up from the last position it computed that the target kept (the whole
    prompt the first time), then decodes one token per further proposal. Since it wrote
    blocks that may be shared through the prefix cache, a request never trusts K/V it did
    not write itself: every request starts from position 0 in the draft (identical values
    are rewritten into shared blocks, so nobody else's draft is disturbed).
    """

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        spec = config.speculative
        draft_config = dataclasses.replace(config, model_path=spec.model, model=config.draft_model,
                                           quantization=spec.quantization, speculative=None, draft_model=None)
        logger.info("loading the draft model %s", spec.model)
        # The draft's block tables change as the target's do (room for proposals given back).
        self.runner = ModelRunner(draft_config, num_blocks=num_blocks, num_proposals=spec.num_speculative_tokens)
        # request id -> what the draft wrote for it: the positions it computed from known
        # tokens, then the proposals it wrote after them (valid only as far as the target
        # kept them: a rejected one's position may even sit in a block given back)
        self._written: dict[str, tuple[int, list[int]]] = {}
        self.last_step_s: float | None = None  # the last step's time per draft pass (None: it made none)

    @torch.inference_mode()
    def propose(self, sched: SchedulerOutput) -> None:
        self.last_step_s = None
        for rid in sched.preempted_req_ids:  # its blocks were freed; it starts over
            self._written.pop(rid, None)
        self.runner.forget_requests(sched.released_req_ids)
        # Every block handed out, whether the draft writes it now or later.
        self.runner.clear_blocks([b for r in sched.scheduled for b in r.new_block_ids])
        reqs = [r for r in sched.scheduled if r.num_draft_slots]
        if not reqs:
            return
        start = time.perf_counter()
        all_ids = {r.request_id: r.prompt_token_ids + r.output_token_ids for r in reqs}
        # Round 0: catch up through the request's last known token; its logits propose d_1.
        rows = []
        for r in reqs:
            known = r.num_computed_tokens + 1
            first = min(self._num_valid(r.request_id, all_ids[r.request_id]), r.num_computed_tokens)
            catch_up = all_ids[r.request_id][first:known]
            # A short catch-up (usually the last step's final token, maybe its last kept
            # proposal before it) runs as decode rows, so the whole pass keeps the fast
            # decode path; a long one (the prompt, the first time) as a prefill chunk.
            head, tail = (catch_up[:1], catch_up[1:]) if len(catch_up) <= _DECODE_ROWS_UP_TO else (catch_up, [])
            rows.append(dataclasses.replace(r, token_ids=head, draft_token_ids=tail, num_computed_tokens=first,
                                            new_block_ids=[], num_draft_slots=0, draft_probs=None))
        drafts: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        active = list(range(len(reqs)))
        num_passes = 0
        while active:
            logits = self.runner.last_token_logits([rows[i] for i in active])  # [len(active), vocab]
            num_passes += 1
            tokens, row_probs = _draw(logits, [reqs[i] for i in active], [drafts[i] for i in active])
            next_active = []
            for i, token, p in zip(active, tokens, row_probs):
                drafts[i].append(token)
                if p is not None:
                    probs[i].append(p)
                r = reqs[i]
                position = r.num_computed_tokens + len(drafts[i])  # where this proposal sits
                if len(drafts[i]) < r.num_draft_slots:
                    rows[i] = dataclasses.replace(rows[i], token_ids=[token], draft_token_ids=[],
                                                  num_computed_tokens=position)
                    next_active.append(i)
            active = next_active
        for r, d, p in zip(reqs, drafts, probs):
            r.draft_token_ids = d
            r.draft_probs = torch.stack(p) if p else None
            # Known tokens through the last one, then every proposal but the last (the
            # draft never computes the last one's K/V).
            self._written[r.request_id] = (r.num_computed_tokens + 1, d[:-1])
        self.last_step_s = (time.perf_counter() - start) / num_passes
        self._forget_finished(sched)

    def _num_valid(self, request_id: str, token_ids: list[int]) -> int:
        """Leading positions of the request whose draft K/V hold its actual tokens: what was
        computed from known tokens, then the proposals up to the first the target did not
        keep (the token there differs: a rejected proposal is never drawn again in its
        place)."""
        known, proposals = self._written.get(request_id, (0, []))
        num = known
        for token in proposals:
            if num >= len(token_ids) or token_ids[num] != token:
                break
            num += 1
        return num

    def _forget_finished(self, sched: SchedulerOutput) -> None:
        """Keep the table from outgrowing the requests that can still come back."""
        if len(self._written) > 4 * max(len(sched.scheduled), 64):
            live = {r.request_id for r in sched.scheduled}
            self._written = {k: v for k, v in self._written.items() if k in live}


def _draw(logits: torch.Tensor, reqs: list[ScheduledRequest],
          drafts: list[list[int]]) -> tuple[list[int], list[torch.Tensor | None]]:
    """The draft's next proposal for each request: its argmax for greedy requests (the
    target keeps a proposal only if it is its own argmax), else a sample from the
    draft's distribution under the request's temperature, top-k, top-p and min-p, which
    is returned ([vocab]) for the rejection test."""
    states = [SamplingState(r.params, r.generator, r.prompt_token_ids, r.output_token_ids + d)
              for r, d in zip(reqs, drafts)]
    random_rows = set(process_logits(logits, states))
    tokens = logits.argmax(dim=-1).tolist()
    row_probs: list[torch.Tensor | None] = [None] * len(reqs)
    for i in random_rows:
        p = torch.softmax(logits[i], dim=-1)
        tokens[i] = int(torch.multinomial(p.cpu(), 1, generator=states[i].generator))  # a host generator
        row_probs[i] = p
    return tokens, row_probs
