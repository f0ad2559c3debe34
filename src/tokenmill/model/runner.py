"""ModelRunner: owns the model and the KV cache tensors; runs one flat batch per step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.model import kernels
from tokenmill.model.cuda_graphs import DecodeGraphs
from tokenmill.model.layers.attention import AttentionMetadata, decode_mask, kv_cache_shape
from tokenmill.model.layers.sampler import Sampler, SamplingState, gather_logprobs
from tokenmill.model.loader import load_model
from tokenmill.model.step_inputs import StepInputs, slot_ids
from tokenmill.model.transfer import to_device
from tokenmill.spec_decode.rejection import SpecGroup, verify
from tokenmill.structured.mask import TokenMasks, TokenMaskWorker, apply_token_masks

logger = logging.getLogger(__name__)


def kv_bytes_per_block(config: EngineConfig) -> int:
    """K and V of one block, for every layer of the target and of the draft model (which
    keeps its own K/V in the same block ids: one allocation covers both)."""
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    models = [config.model] + ([config.draft_model] if config.draft_model else [])
    return sum(2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim * itemsize for m in models)


def num_kv_blocks_for(config: EngineConfig) -> int:
    """How many KV blocks the budget buys, capped at what the scheduler could ever use."""
    cache, sched = config.cache, config.scheduler
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    budget = cache.kv_cache_memory_bytes
    if budget is None:
        if config.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(config.device)
            budget = int(free_bytes * cache.kv_cache_memory_fraction)
        else:
            import os

            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            budget = int(total * cache.kv_cache_memory_fraction)
    max_useful = sched.max_num_seqs * -(-sched.max_model_len // cache.block_size)
    return max(1, min(budget // kv_bytes_per_block(config), max_useful))


class ModelRunner:
    def __init__(self, config: EngineConfig, num_blocks: int | None = None, num_proposals: int | None = None) -> None:
        """Args:
            num_blocks: KV blocks to hold (a draft model's runner mirrors the target's
                block ids); None: what the budget buys (`num_kv_blocks_for`).
            num_proposals: the most proposals a request gets per step (a draft model's
                runner passes the target's); None: from config.speculative.
        """
        self.config = config
        self.device = config.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # streams, events, graphs and Triton launches: this GPU
        self.block_size = config.cache.block_size
        max_positions = max(config.scheduler.max_model_len, 1)
        self.model = load_model(config.model_path, config.model, config.dtype, self.device, max_positions,
                                keep_stored=config.quantization == "auto")
        self.num_blocks = num_kv_blocks_for(config) if num_blocks is None else num_blocks
        m = config.model
        shape = kv_cache_shape(self.num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        # torch.empty: untouched pages cost no RAM on CPU until a block is first written.
        self.kv_caches = [torch.empty(shape, dtype=config.dtype, device=self.device) for _ in range(m.num_layers)]
        self.sampler = Sampler()
        self.token_masks = TokenMaskWorker(m.vocab_size)  # structured output's masks, beside the forward pass
        # When set, receives every scored prompt position's full log-softmax row as
        # sink(request_id, first_position, rows [count, vocab]); row i predicts prompt
        # token first_position + i + 1. The quality lab (bench/quality) measures KL
        # divergence on them, through the real engine path.
        self.prompt_logprobs_sink: Callable[[str, int, torch.Tensor], None] | None = None
        # Decode attention runs a kernel when there is one for this device (the CPU one is
        # built now rather than inside the first step; Triton on a GPU). It reads exactly
        # each request's tokens; the batched-matmul fallback reads whole blocks, so it needs
        # a mask and zeroed block tails.
        self.decode_kernel = kernels.decode_attention_kernel(self.device, m.num_heads, m.num_kv_heads, m.head_dim)
        if not self.decode_kernel:
            self._clear_blocks([0])  # padding entries of decode block tables point at block 0
        # The GPU path (Triton kernels; on CPU only through their interpreter, in tests):
        # step inputs in persistent buffers, and CUDA graphs of decode steps.
        self.inputs: StepInputs | None = None
        self.graphs: DecodeGraphs | None = None
        if self.decode_kernel and kernels.paged_prefill_kernel(self.device):
            if num_proposals is None:
                num_proposals = config.speculative.num_speculative_tokens if config.speculative else 0
            self.inputs = _step_inputs(config, num_proposals)
            if self.device.type == "cuda" and not config.enforce_eager:
                self.graphs = DecodeGraphs(self.model, self.kv_caches, self.inputs, self.block_size,
                                           config.scheduler.max_num_seqs)
                self.graphs.capture()

    def _clear_blocks(self, block_ids: list[int]) -> None:
        # The fallback decode attention reads whole blocks and masks the unused tail;
        # masked scores are fine, but uninitialised memory may hold NaN, and 0 * NaN in
        # the weighted sum of V poisons the output. Zeroing a block when it is handed out
        # is cheap.
        for kv_cache in self.kv_caches:
            for block_id in block_ids:  # at most one per request; faster than index_fill_ on dim 2
                kv_cache[:, :, block_id].zero_()

    def clear_blocks(self, block_ids: list[int]) -> None:
        """Zero these blocks if decode attention reads whole blocks (no kernel): a draft
        model's runner calls it for the blocks the target's step allocated."""
        if not self.decode_kernel and block_ids:
            self._clear_blocks(block_ids)

    def forget_requests(self, request_ids: list[str]) -> None:
        """Preempted or finished requests: the block-table rows kept for them are stale."""
        if self.inputs is not None and request_ids:
            self.inputs.forget(request_ids)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.forget_requests(sched.released_req_ids)
        reqs = _decodes_first(sched.scheduled)
        for r in reqs:
            if r.draft_token_ids and r.matcher is not None:
                # Proposals the grammar refuses would be rejected anyway (their
                # probability is 0); cutting them here keeps every row's mask defined.
                num_valid = r.matcher.validate_tokens(r.draft_token_ids)
                if num_valid < len(r.draft_token_ids):
                    del r.draft_token_ids[num_valid:]
                    if r.draft_probs is not None:
                        # The refused proposal was drawn from the draft's row num_valid: that
                        # position is a certain rejection, resampled from its residual.
                        r.draft_probs = r.draft_probs[:num_valid + 1]
        if not self.decode_kernel:
            # A new block this step leaves partly unwritten is read whole by later decodes
            # (a decode's new blocks may hold room for more proposals than it got: all).
            partial = [b for r in reqs if r.is_decode for b in r.new_block_ids] + [
                r.block_ids[-1]
                for r in reqs
                if not r.is_decode and r.new_block_ids and (r.num_computed_tokens + len(r.token_ids)) % self.block_size
            ]
            if partial:
                self._clear_blocks(partial)
        # The requests' matchers hold their output so far, which this step does not change
        # until it has sampled: their masks are computed while the model runs.
        masks = self.token_masks.start([m for r in reqs if r.needs_sample for m in _row_matchers(r)])
        hidden, starts = self._forward(reqs)
        return self._sample(reqs, starts, hidden, masks)

    @torch.inference_mode()
    def last_token_logits(self, reqs: list[ScheduledRequest]) -> torch.Tensor:
        """Run the model over `reqs` (their K/V written to this runner's cache) and return
        the logits of each one's last token, [len(reqs), vocab], in the order given (how
        a draft model proposes)."""
        order = _decodes_first(reqs)
        hidden, starts = self._forward(order)
        rows = {id(r): s + r.num_query_tokens - 1 for r, s in zip(order, starts)}
        index = to_device([rows[id(r)] for r in reqs], self.device)
        return self.model.compute_logits(hidden[index])

    def _forward(self, reqs: list[ScheduledRequest]) -> tuple[torch.Tensor, list[int]]:
        """One pass of the model over the flat batch of `reqs` (decodes first).

        Returns:
            Final hidden states [T, hidden] and each request's first row in them.
        """
        if self.inputs is not None and self.inputs.fits(reqs):
            return self._forward_persistent(reqs)
        # Else (no GPU path, or a step larger than the buffers, such as a draft model's
        # first catch-up over a whole context): tensors built for this step alone.
        input_ids, positions, slots = [], [], []
        starts: list[int] = []
        for r in reqs:
            starts.append(len(input_ids))
            input_ids.extend(r.token_ids)
            input_ids.extend(r.draft_token_ids)
            start = r.num_computed_tokens
            positions.extend(range(start, start + r.num_query_tokens))
            slots.extend(slot_ids(r.block_ids, start, start + r.num_query_tokens, self.block_size))
        dev = self.device
        meta = self._attention_metadata(reqs, starts, to_device(slots, dev, torch.long))
        hidden = self.model(
            to_device(input_ids, dev, torch.long),
            to_device(positions, dev, torch.long),
            self.kv_caches,
            meta,
        )  # [T, hidden]
        return hidden, starts

    def _forward_persistent(self, reqs: list[ScheduledRequest]) -> tuple[torch.Tensor, list[int]]:
        """`_forward` on the GPU path: inputs through the persistent buffers, a pure decode
        step through its CUDA graph when there is one."""
        starts, total = [], 0
        for r in reqs:
            starts.append(total)
            total += r.num_query_tokens
        size = None
        if self.graphs is not None and total == len(reqs) and all(r.is_decode for r in reqs):
            size = self.graphs.bucket(total)
        step = self.inputs.prepare(reqs, starts, self.block_size, pad_decodes_to=size or 0)
        if size is not None:
            return self.graphs.replay(size, total), starts
        num_decodes = sum(1 for r in reqs if r.is_decode)
        meta = step.attention_metadata([(s, len(r.token_ids), r.num_computed_tokens, None)
                                        for r, s in zip(reqs[num_decodes:], starts[num_decodes:])])
        return self.model(step.input_ids, step.positions, self.kv_caches, meta), starts

    def _attention_metadata(
        self, reqs: list[ScheduledRequest], starts: list[int], slot_mapping: torch.Tensor
    ) -> AttentionMetadata:
        dev = self.device
        decodes = [r for r in reqs if r.is_decode]
        tables = seq_lens = mask = None
        if decodes:
            # A decode with proposals is one decode row per token: row j sits at position
            # start + j and sees the cache through itself. Every row's K/V is written before
            # any row attends, so the rows together are causal attention over the chunk.
            max_blocks = max(len(r.block_ids) for r in decodes)
            tables = to_device(
                [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in decodes for _ in range(r.num_query_tokens)],
                dev, torch.int32,
            )  # [num_decode_rows, max_blocks]
            seq_lens = to_device([r.num_computed_tokens + 1 + j for r in decodes for j in range(r.num_query_tokens)],
                                 dev, torch.int32)
            if not self.decode_kernel:
                mask = decode_mask(seq_lens, max_blocks, self.block_size)  # once per step, shared by every layer
        prefills = []
        for r, start in zip(reqs[len(decodes) :], starts[len(decodes) :]):
            num_blocks = -(-(r.num_computed_tokens + len(r.token_ids)) // self.block_size)
            ids = to_device(r.block_ids[:num_blocks], dev, torch.long)
            prefills.append((start, len(r.token_ids), r.num_computed_tokens, ids))
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=0 if seq_lens is None else len(seq_lens),
            decode_block_tables=tables,
            decode_seq_lens=seq_lens,
            decode_mask=mask,
            prefills=prefills,
        )

    def _sample(self, reqs: list[ScheduledRequest], starts: list[int], hidden: torch.Tensor,
                masks: Future[TokenMasks | None] | None) -> ModelRunnerOutput:
        # Rows of `hidden` that need logits: each sampling request's last token (and its
        # proposals), then the scored prompt positions of requests that asked for prompt
        # logprobs.
        sample_reqs = [(r, s) for r, s in zip(reqs, starts) if r.needs_sample]
        rows = [s + len(r.token_ids) - 1 + j for r, s in sample_reqs for j in range(1 + len(r.draft_token_ids))]
        num_sample_rows = len(rows)
        prompt_rows: list[tuple[ScheduledRequest, int, int]] = []  # (req, first row in logits, count)
        for r, s in zip(reqs, starts):
            if r.num_prompt_logprob_positions:
                prompt_rows.append((r, len(rows), r.num_prompt_logprob_positions))
                first = s + r.first_prompt_logprob_position - r.num_computed_tokens
                rows.extend(range(first, first + r.num_prompt_logprob_positions))
        out = ModelRunnerOutput({}, {}, {})
        if not rows:
            return out
        logits = self.model.compute_logits(hidden[to_device(rows, self.device)])  # [R, V]
        if sample_reqs:
            sample_logits = logits[:num_sample_rows]
            if masks is not None:
                apply_token_masks(sample_logits, masks.result())  # structured output
            if num_sample_rows == len(sample_reqs) and all(r.draft_probs is None for r, _ in sample_reqs):
                # No proposals (nor a refused one to resample): the plain sampler.
                states = [SamplingState(r.params, r.generator, r.prompt_token_ids, r.output_token_ids)
                          for r, _ in sample_reqs]
                result = self.sampler.sample(sample_logits, states)
                for (r, _), tok, lp in zip(sample_reqs, result.token_ids, result.logprobs):
                    out.sampled[r.request_id] = [tok]
                    if lp is not None:
                        out.logprobs[r.request_id] = [lp]
            else:
                self._verify(sample_logits, [r for r, _ in sample_reqs], out)
        for r, first, count in prompt_rows:
            p0 = r.first_prompt_logprob_position
            targets = to_device(r.prompt_token_ids[p0 + 1 : p0 + 1 + count], self.device)
            lps = torch.log_softmax(logits[first : first + count], dim=-1)  # [count, vocab]
            if self.prompt_logprobs_sink is not None:
                self.prompt_logprobs_sink(r.request_id, p0, lps)
            num_top = min(r.params.prompt_logprobs, lps.shape[-1])
            out.prompt_logprobs[r.request_id] = gather_logprobs(lps, targets, num_top)
        return out

    def _verify(self, logits: torch.Tensor, sample_reqs: list[ScheduledRequest], out: ModelRunnerOutput) -> None:
        """Speculative step: keep each request's proposals the target agrees with."""
        states: list[SamplingState] = []
        groups: list[SpecGroup] = []
        for r in sample_reqs:
            groups.append(SpecGroup(len(states), r.draft_token_ids, r.draft_probs))
            for j in range(1 + len(r.draft_token_ids)):
                output = r.output_token_ids + r.draft_token_ids[:j] if j else r.output_token_ids
                states.append(SamplingState(r.params, r.generator, r.prompt_token_ids, output))
        for r, verified in zip(sample_reqs, verify(logits, states, groups)):
            out.sampled[r.request_id] = verified.token_ids
            if verified.logprobs is not None:
                out.logprobs[r.request_id] = verified.logprobs


def _step_inputs(config: EngineConfig, num_spec: int) -> StepInputs:
    """Buffers for the largest step the scheduler forms: decodes with every proposal slot
    (one row per token), or a full token budget."""
    sched, bs = config.scheduler, config.cache.block_size
    max_rows = sched.max_num_seqs * (1 + num_spec)
    tail_blocks = 2 + -(-num_spec // bs)  # room for proposals may be given back and reallocated
    return StepInputs(max_tokens=max(sched.max_num_batched_tokens, max_rows), max_rows=max_rows,
                      max_blocks=-(-sched.max_model_len // bs) + tail_blocks, tail_blocks=tail_blocks,
                      device=config.device)


def _decodes_first(reqs: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """Decodes (one known token, maybe proposals) first: they share one attention call."""
    return [r for r in reqs if r.is_decode] + [r for r in reqs if not r.is_decode]


def _row_matchers(r: ScheduledRequest) -> list:
    """The grammar state of each of a sampling request's logits rows: its matcher, then
    for row j a copy advanced by its first j proposals (None rows are unconstrained)."""
    if r.matcher is None or not r.draft_token_ids:
        return [r.matcher] * (1 + len(r.draft_token_ids))
    matchers = [r.matcher]
    for token in r.draft_token_ids:
        advanced = matchers[-1].deep_copy()
        advanced.consume_token(token)
        matchers.append(advanced)
    return matchers
