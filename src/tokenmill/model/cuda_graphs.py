"""CUDA graphs of the model's forward pass for decode-only steps.

A decode step of a small model launches a few hundred kernels that each run for
microseconds: the launches, not the GPU, set the pace. A graph replays the whole forward
pass as one launch. One graph per batch-size bucket (vLLM's sizes: 1, 2, 4, then
multiples of 8); a step of n decodes replays the smallest bucket >= n, its extra rows
padding that writes no K/V and attends to one token (StepInputs.prepare). The graphs
read the step inputs at their fixed addresses, so a replay needs no argument.

Only pure decode steps (one token per request) replay; prefills, mixed steps and steps
with speculative proposals run eagerly. `enforce_eager` turns graphs off.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.model.step_inputs import StepInputs

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512  # vLLM's default largest captured batch


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (capped)."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """Owner of the captured graphs and of their output buffers."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], inputs: StepInputs,
                 block_size: int, max_num_seqs: int) -> None:
        self.model, self.kv_caches, self.inputs, self.block_size = model, kv_caches, inputs, block_size
        self.sizes = capture_sizes(max_num_seqs)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, num_rows: int) -> int | None:
        """The batch size a step of `num_rows` decodes replays, or None (too many: eager)."""
        return next((s for s in self.sizes if s >= num_rows), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so the smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            # Padding only: no K/V is written while capturing.
            step = self.inputs.prepare([], [], self.block_size, pad_decodes_to=size)
            meta = step.attention_metadata(prefills=[])
            # Warm up outside the graph (Triton compiles its kernels on first launch).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.model(step.input_ids, step.positions, self.kv_caches, meta)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(step.input_ids, step.positions, self.kv_caches, meta)
            pool = graph.pool()
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s..%s (%d graphs) in %.1f s",
                    self.sizes[0], self.sizes[-1], len(self.sizes), time.perf_counter() - start)

    def replay(self, size: int, num_rows: int) -> torch.Tensor:
        """Run the graph of `size` over the inputs `prepare` wrote; the first `num_rows`
        rows of its final hidden states [num_rows, hidden]."""
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:num_rows]
