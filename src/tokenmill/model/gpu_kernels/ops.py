"""TritonOps: the Triton kernels behind the same operator names and arguments as the CPU
kernels (torch.ops.tokenmill), so a layer calls `kernels.for_tensor(x).rms_norm(...)`
whatever device x is on."""

from __future__ import annotations

import functools

import torch

from tokenmill.model.gpu_kernels import (
    decode_attention,
    elementwise,
    prefill_attention,
    rotary_cache,
    sampling,
)

# Decode attention keeps a KV group's query heads in one program's registers.
MAX_GROUP = 16
MAX_HEAD_DIM = 256


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class TritonOps:
    """Stateless; one instance serves every device."""

    name = "triton"

    def kernel_limits(self) -> tuple[int, int]:
        """(largest query-head group, largest head dim) decode attention takes."""
        return MAX_GROUP, MAX_HEAD_DIM

    def rms_norm(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        elementwise.rms_norm(out, x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        """residual += x; x = norm(residual), both in place (the CPU op's contract)."""
        elementwise.rms_norm(x, x, weight, eps, residual=residual)

    def silu_and_mul(self, out: torch.Tensor, gate_up: torch.Tensor) -> None:
        elementwise.silu_and_mul(out, gate_up)

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
        elementwise.apply_token_bitmask(logits, bitmask, rows)

    def rotary_and_cache(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                         kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> None:
        rotary_cache.rotary_and_cache(qkv, cos, signed_sin, kv_cache, slot_mapping, num_heads)

    def paged_decode_attention(self, out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               num_splits: int | None = None) -> None:
        """num_splits None: from the shapes alone (the table's width bounds every row's
        length), so a step costs no host sync and a CUDA graph's replays keep it."""
        if num_splits is None:
            num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 1
            max_len = block_tables.shape[1] * kv_cache.shape[3]
            num_splits = decode_attention.num_splits_for(q.shape[0], kv_cache.shape[1], max_len, num_sms)
        decode_attention.paged_decode_attention(out, q, kv_cache, block_tables, seq_lens, scale, num_splits)

    def paged_prefill_attention(self, out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor,
                                query_starts: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                                block_tables: torch.Tensor, max_query_len: int, scale: float) -> None:
        prefill_attention.paged_prefill_attention(out, q, kv_cache, query_starts, query_lens, context_lens,
                                                  block_tables, max_query_len, scale)

    def sample_exponential_race(self, sampled: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> None:
        sampling.sample_exponential_race(sampled, logits, keys)
