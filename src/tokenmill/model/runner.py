"""ModelRunner: owns the model and the KV cache tensors; runs one flat batch per step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.model import kernels
from tokenmill.model.layers.attention import AttentionMetadata, decode_mask, kv_cache_shape
from tokenmill.model.layers.sampler import Sampler, SamplingState, gather_logprobs
from tokenmill.model.loader import load_model
from tokenmill.structured.mask import TokenMasks, TokenMaskWorker, apply_token_masks

logger = logging.getLogger(__name__)


def kv_bytes_per_block(config: EngineConfig) -> int:
    m = config.model
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    return 2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim * itemsize


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
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        max_positions = max(config.scheduler.max_model_len, 1)
        self.model = load_model(config.model_path, config.model, config.dtype, self.device, max_positions,
                                keep_stored=config.quantization == "auto")
        self.num_blocks = num_kv_blocks_for(config)
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
        # Decode attention runs the compiled kernel when it is there (built now, on CPU,
        # rather than inside the first step). The kernel reads exactly each request's
        # tokens; the batched-matmul fallback reads whole blocks, so it needs a mask and
        # zeroed block tails.
        self.decode_kernel = self.device.type == "cpu" and kernels.decode_attention_kernel(
            m.num_heads, m.num_kv_heads, m.head_dim
        )
        if not self.decode_kernel:
            self._clear_blocks([0])  # padding entries of decode block tables point at block 0

    def _clear_blocks(self, block_ids: list[int]) -> None:
        # The fallback decode attention reads whole blocks and masks the unused tail;
        # masked scores are fine, but uninitialised memory may hold NaN, and 0 * NaN in
        # the weighted sum of V poisons the output. Zeroing a block when it is handed out
        # is cheap.
        for kv_cache in self.kv_caches:
            for block_id in block_ids:  # at most one per request; faster than index_fill_ on dim 2
                kv_cache[:, :, block_id].zero_()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # Decodes (one query token) first: they share one batched attention call.
        decodes = [r for r in sched.scheduled if len(r.token_ids) == 1]
        reqs = decodes + [r for r in sched.scheduled if len(r.token_ids) != 1]
        if not self.decode_kernel:
            # A new block this step leaves partly unwritten is read whole by later decodes.
            partial = [
                r.block_ids[-1]
                for r in reqs
                if r.new_block_ids and (r.num_computed_tokens + len(r.token_ids)) % self.block_size
            ]
            if partial:
                self._clear_blocks(partial)
        input_ids, positions, slots = [], [], []
        starts: list[int] = []
        for r in reqs:
            starts.append(len(input_ids))
            input_ids.extend(r.token_ids)
            start = r.num_computed_tokens
            positions.extend(range(start, start + len(r.token_ids)))
            slots.extend(self._slots(r.block_ids, start, start + len(r.token_ids)))
        dev = self.device
        # The requests' matchers hold their output so far, which this step does not change
        # until it has sampled: their masks are computed while the model runs.
        masks = self.token_masks.start([r.matcher for r in reqs if r.needs_sample])
        meta = self._attention_metadata(reqs, len(decodes), starts, torch.tensor(slots, dtype=torch.long, device=dev))
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
        )  # [T, hidden]
        return self._sample(reqs, starts, hidden, masks)

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Flat cache slots of positions start..end-1, built a block run at a time."""
        bs = self.block_size
        slots: list[int] = []
        for i in range(start // bs, (end - 1) // bs + 1):
            base = block_ids[i] * bs - i * bs  # slot of position p in block i: base + p
            slots.extend(range(base + max(start, i * bs), base + min(end, (i + 1) * bs)))
        return slots

    def _attention_metadata(
        self, reqs: list[ScheduledRequest], num_decodes: int, starts: list[int], slot_mapping: torch.Tensor
    ) -> AttentionMetadata:
        dev = self.device
        decodes = reqs[:num_decodes]
        tables = seq_lens = mask = None
        if decodes:
            max_blocks = max(len(r.block_ids) for r in decodes)
            tables = torch.tensor(
                [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in decodes],
                dtype=torch.int32,
                device=dev,
            )  # [num_decodes, max_blocks]
            seq_lens = torch.tensor([r.num_computed_tokens + 1 for r in decodes], dtype=torch.int32, device=dev)
            if not self.decode_kernel:
                mask = decode_mask(seq_lens, max_blocks, self.block_size)  # once per step, shared by every layer
        prefills = []
        for r, start in zip(reqs[len(decodes) :], starts[len(decodes) :]):
            num_blocks = -(-(r.num_computed_tokens + len(r.token_ids)) // self.block_size)
            ids = torch.tensor(r.block_ids[:num_blocks], dtype=torch.long, device=dev)
            prefills.append((start, len(r.token_ids), r.num_computed_tokens, ids))
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=len(decodes),
            decode_block_tables=tables,
            decode_seq_lens=seq_lens,
            decode_mask=mask,
            prefills=prefills,
        )

    def _sample(self, reqs: list[ScheduledRequest], starts: list[int], hidden: torch.Tensor,
                masks: Future[TokenMasks | None] | None) -> ModelRunnerOutput:
        # Rows of `hidden` that need logits: each sampling request's last token, then
        # the scored prompt positions of requests that asked for prompt logprobs.
        sample_reqs = [r for r, s in zip(reqs, starts) if r.needs_sample]
        rows = [s + len(r.token_ids) - 1 for r, s in zip(reqs, starts) if r.needs_sample]
        prompt_rows: list[tuple[ScheduledRequest, int, int]] = []  # (req, first row in logits, count)
        for r, s in zip(reqs, starts):
            if r.num_prompt_logprob_positions:
                prompt_rows.append((r, len(rows), r.num_prompt_logprob_positions))
                first = s + r.first_prompt_logprob_position - r.num_computed_tokens
                rows.extend(range(first, first + r.num_prompt_logprob_positions))
        out = ModelRunnerOutput({}, {}, {})
        if not rows:
            return out
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [R, V]
        if sample_reqs:
            states = [
                SamplingState(r.params, r.generator, r.prompt_token_ids, r.output_token_ids)
                for r in sample_reqs
            ]
            sample_logits = logits[: len(sample_reqs)]
            if masks is not None:
                apply_token_masks(sample_logits, masks.result())  # structured output
            result = self.sampler.sample(sample_logits, states)
            for r, tok, lp in zip(sample_reqs, result.token_ids, result.logprobs):
                out.sampled[r.request_id] = tok
                if lp is not None:
                    out.logprobs[r.request_id] = lp
        for r, first, count in prompt_rows:
            p0 = r.first_prompt_logprob_position
            targets = torch.tensor(r.prompt_token_ids[p0 + 1 : p0 + 1 + count], device=self.device)
            lps = torch.log_softmax(logits[first : first + count], dim=-1)  # [count, vocab]
            if self.prompt_logprobs_sink is not None:
                self.prompt_logprobs_sink(r.request_id, p0, lps)
            num_top = min(r.params.prompt_logprobs, lps.shape[-1])
            out.prompt_logprobs[r.request_id] = gather_logprobs(lps, targets, num_top)
        return out
