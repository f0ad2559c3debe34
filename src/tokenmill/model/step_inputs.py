"""A step's inputs in buffers allocated once, for the GPU runner.

Building a step's tensors from Python lists allocates on the device and copies each one
separately; at GPU speeds a decode step is short enough for that to show. Here every
input lives at a fixed address (what a CUDA graph replays against):

- input ids, positions and cache slots: one int64 buffer, one copy per step;
- per-row columns (decode sequence lengths, table rows; prefill chunk starts, lengths,
  cached lengths, table rows): one int32 buffer, one copy per step;
- block tables: one row per request, kept on the device across steps. A step sends only
  the entries that changed (a new block every block_size tokens of a decode), as
  (row, column, block id) triples, one more copy; the decode rows' and the prefill chunks'
  tables are then gathered from the rows on the device.

Host buffers are pinned (CUDA) so the copies are asynchronous. The next `prepare` waits
for the previous step's copies before it rewrites them (an event; already passed whenever
that step synced for its sampled ids, so it costs a wait only after a step that sampled
nothing, such as a lone prefill chunk).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.engine.scheduler_output import ScheduledRequest
from tokenmill.model.layers.attention import AttentionMetadata, PagedPrefills

# int32 column buffer layout, in units of max_rows: decode seq lens, decode table rows,
# prefill starts, prefill lengths, prefill cached lengths, prefill table rows.
_DECODE_LENS, _DECODE_ROWS, _PREFILL_STARTS, _PREFILL_LENS, _PREFILL_CTX, _PREFILL_ROWS = range(6)


@dataclass
class StepTensors:
    """Device views of one step's inputs: the same addresses for every step of the same
    shape (what a CUDA graph captures); valid until the next prepare."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64; -1 for padding rows
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] int32
    decode_seq_lens: torch.Tensor | None  # [D] int32
    paged_prefills: PagedPrefills | None


    def attention_metadata(self, prefills: list[tuple[int, int, int, None]]) -> AttentionMetadata:
        """The step's attention metadata (the decode kernel reads exactly each row's tokens:
        no mask). `prefills`: the chunks as (first row, query tokens, cached tokens, None)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping,
            num_decodes=0 if self.decode_seq_lens is None else self.decode_seq_lens.shape[0],
            decode_block_tables=self.decode_block_tables,
            decode_seq_lens=self.decode_seq_lens,
            decode_mask=None,
            prefills=prefills,
            paged_prefills=self.paged_prefills,
        )


@dataclass
class _Row:
    source: list[int]  # the block-id list last seen (the same object while nothing changes)
    known: list[int]  # what the device row holds


class StepInputs:
    """Owner of the persistent step buffers and of the device block-table rows."""

    def __init__(self, max_tokens: int, max_rows: int, max_blocks: int, tail_blocks: int,
                 device: torch.device) -> None:
        """Args:
            max_tokens: tokens one step may hold (the scheduler's token budget, plus padding).
            max_rows: decode rows or prefill chunks one step may hold.
            max_blocks: block-table width (max_model_len / block_size, rounded up).
            tail_blocks: how many of a live request's last blocks may change other than by
                appending (room for proposals given back and reallocated).
        """
        pin = device.type == "cuda"
        self.device = device
        self.max_tokens, self.max_rows, self.max_blocks = max_tokens, max_rows, max_blocks
        self.tail_blocks = tail_blocks
        self._tokens_host = torch.zeros(3, max_tokens, dtype=torch.int64, pin_memory=pin)
        self._tokens = torch.zeros(3, max_tokens, dtype=torch.int64, device=device)
        self._cols_host = torch.zeros(6, max_rows, dtype=torch.int32, pin_memory=pin)
        self._cols = torch.zeros(6, max_rows, dtype=torch.int32, device=device)
        # Room for every running request and as many finished ones not yet evicted.
        self._table_rows = 2 * max_rows
        self._tables = torch.zeros(self._table_rows, max_blocks, dtype=torch.int32, device=device)
        self._decode_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self._prefill_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self._updates_host = torch.zeros(1024, 3, dtype=torch.int32, pin_memory=pin)  # (row, column, block id)
        self._updates = torch.zeros(1024, 3, dtype=torch.int32, device=device)
        self._rows: OrderedDict[str, tuple[int, _Row]] = OrderedDict()  # request id -> (row, state), LRU order
        self._free_rows = list(range(self._table_rows - 1, -1, -1))
        self._copied: torch.cuda.Event | None = None  # the last step's copies (CUDA)

    def fits(self, reqs: list[ScheduledRequest]) -> bool:
        """Whether a step of `reqs` fits the buffers."""
        decode_rows = sum(r.num_query_tokens for r in reqs if r.is_decode)
        return (max(decode_rows, len(reqs) - sum(1 for r in reqs if r.is_decode)) <= self.max_rows
                and sum(r.num_query_tokens for r in reqs) <= self.max_tokens
                and all(len(r.block_ids) <= self.max_blocks for r in reqs))

    def prepare(self, reqs: list[ScheduledRequest], starts: list[int], block_size: int,
                pad_decodes_to: int = 0) -> StepTensors:
        """Fill the buffers for `reqs` (decodes first, `starts` their first rows) and copy them.

        Args:
            pad_decodes_to: a decode-only step's rows are padded to this many (a CUDA graph's
                batch size): padding rows write no K/V (slot -1) and attend to one token.
        """
        if self._copied is not None:
            self._copied.synchronize()  # the host buffers are free to rewrite
        tokens = self._tokens_host.numpy()
        cols = self._cols_host.numpy()
        decodes = [r for r in reqs if r.is_decode]
        chunks = reqs[len(decodes):]
        num_tokens = 0
        for r in reqs:
            n = r.num_query_tokens
            start = r.num_computed_tokens
            if n == 1:  # a plain decode, most rows of most steps: scalars, no numpy temporaries
                tokens[0, num_tokens] = r.token_ids[0]
                tokens[1, num_tokens] = start
                tokens[2, num_tokens] = r.block_ids[start // block_size] * block_size + start % block_size
            else:
                tokens[0, num_tokens:num_tokens + len(r.token_ids)] = r.token_ids
                tokens[0, num_tokens + len(r.token_ids):num_tokens + n] = r.draft_token_ids
                tokens[1, num_tokens:num_tokens + n] = np.arange(start, start + n)
                tokens[2, num_tokens:num_tokens + n] = slot_ids(r.block_ids, start, start + n, block_size)
            num_tokens += n
        updates = self._table_updates(reqs)
        # Decode rows: a decode with proposals is one row per token (each sees one more).
        num_decode_rows = 0
        for r in decodes:
            row = self._rows[r.request_id][0]
            for j in range(r.num_query_tokens):
                cols[_DECODE_LENS, num_decode_rows] = r.num_computed_tokens + 1 + j
                cols[_DECODE_ROWS, num_decode_rows] = row
                num_decode_rows += 1
        if pad_decodes_to > num_decode_rows:
            pad = slice(num_tokens, pad_decodes_to)
            tokens[0, pad], tokens[1, pad], tokens[2, pad] = 0, 0, -1
            cols[_DECODE_LENS, num_decode_rows:pad_decodes_to] = 1
            cols[_DECODE_ROWS, num_decode_rows:pad_decodes_to] = cols[_DECODE_ROWS, 0] if num_decode_rows else 0
            num_tokens = num_decode_rows = pad_decodes_to
        for i, (r, start) in enumerate(zip(chunks, starts[len(decodes):])):
            cols[_PREFILL_STARTS, i], cols[_PREFILL_LENS, i] = start, len(r.token_ids)
            cols[_PREFILL_CTX, i], cols[_PREFILL_ROWS, i] = r.num_computed_tokens, self._rows[r.request_id][0]

        # The copies: tokens, columns and table entries, each one asynchronous transfer. The
        # whole buffers (tens of KB): a contiguous copy costs less than a strided slice's.
        self._tokens.copy_(self._tokens_host, non_blocking=True)
        self._cols.copy_(self._cols_host, non_blocking=True)
        if updates:
            self._apply_updates(updates)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        decode_tables = seq_lens = None
        if num_decode_rows:
            decode_tables = self._decode_tables[:num_decode_rows]
            torch.index_select(self._tables, 0, self._cols[_DECODE_ROWS, :num_decode_rows], out=decode_tables)
            seq_lens = self._cols[_DECODE_LENS, :num_decode_rows]
        prefills = None
        if chunks:
            p = len(chunks)
            prefill_tables = self._prefill_tables[:p]
            torch.index_select(self._tables, 0, self._cols[_PREFILL_ROWS, :p], out=prefill_tables)
            prefills = PagedPrefills(
                query_starts=self._cols[_PREFILL_STARTS, :p], query_lens=self._cols[_PREFILL_LENS, :p],
                context_lens=self._cols[_PREFILL_CTX, :p], block_tables=prefill_tables,
                max_query_len=max(len(r.token_ids) for r in chunks),
            )
        return StepTensors(self._tokens[0, :num_tokens], self._tokens[1, :num_tokens], self._tokens[2, :num_tokens],
                           decode_tables, seq_lens, prefills)

    def forget(self, request_ids: list[str]) -> None:
        """Drop these requests' rows: preempted, their blocks were freed, and they start
        over with a new table."""
        for rid in request_ids:
            entry = self._rows.pop(rid, None)
            if entry is not None:
                self._free_rows.append(entry[0])

    def _table_updates(self, reqs: list[ScheduledRequest]) -> list[tuple[int, int, int]]:
        """(row, column, block id) for each table entry that changed since the device row
        was written; gives each new request a row (evicting the least recently used one
        this step does not hold).

        A live request's table only changes at its tail: blocks are appended, and blocks
        allotted to unverified proposals may be given back and reallocated (at most
        `tail_blocks`). Only that tail is compared, so a step costs O(requests), not
        O(context)."""
        updates: list[tuple[int, int, int]] = []
        for r in reqs:
            entry = self._rows.get(r.request_id)
            if entry is None:
                entry = (self._take_row(reqs), _Row(source=[], known=[]))
                self._rows[r.request_id] = entry
            else:
                self._rows.move_to_end(r.request_id)
            row, state = entry
            ids, known = r.block_ids, state.known
            if ids is state.source and len(ids) == len(known):
                continue  # the same list, unchanged
            first = max(0, len(known) - self.tail_blocks)
            common = min(len(ids), len(known))
            while first < common and ids[first] == known[first]:
                first += 1
            updates.extend((row, col, ids[col]) for col in range(first, len(ids)))
            del known[first:]
            known.extend(ids[first:])
            state.source = ids
        return updates

    def _take_row(self, reqs: list[ScheduledRequest]) -> int:
        if self._free_rows:
            return self._free_rows.pop()
        in_step = {r.request_id for r in reqs}  # only when a row must be evicted
        for rid in self._rows:  # least recently used first
            if rid not in in_step:
                return self._rows.pop(rid)[0]
        raise RuntimeError("more requests in one step than block-table rows")

    def _apply_updates(self, updates: list[tuple[int, int, int]]) -> None:
        n = len(updates)
        if n > self._updates_host.shape[0]:
            size = 1 << (n - 1).bit_length()
            pin = self.device.type == "cuda"
            self._updates_host = torch.zeros(size, 3, dtype=torch.int32, pin_memory=pin)
            self._updates = torch.zeros(size, 3, dtype=torch.int32, device=self.device)
        self._updates_host.numpy()[:n] = updates
        dev = self._updates[:n]
        dev.copy_(self._updates_host[:n], non_blocking=True)  # the first n rows: contiguous
        self._tables.index_put_((dev[:, 0].long(), dev[:, 1].long()), dev[:, 2])


def slot_ids(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions start..end-1, built a block run at a time."""
    slots: list[int] = []
    for i in range(start // block_size, (end - 1) // block_size + 1):
        base = block_ids[i] * block_size - i * block_size  # slot of position p in block i: base + p
        slots.extend(range(base + max(start, i * block_size), base + min(end, (i + 1) * block_size)))
    return slots
