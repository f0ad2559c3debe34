"""StepInputs, the GPU runner's persistent step buffers, on CPU tensors: what the device
receives each step equals what the list-building path computes, and the block-table rows
follow every way a request's blocks change."""

from __future__ import annotations

import torch

from tokenmill.engine.scheduler_output import ScheduledRequest
from tokenmill.model.step_inputs import StepInputs
from tokenmill.sampling_params import SamplingParams

BS = 4


def _req(rid, token_ids, computed, blocks, drafts=()):
    return ScheduledRequest(rid, token_ids, computed, blocks, [], True, SamplingParams(), None, [], [],
                            draft_token_ids=list(drafts))


def _inputs(**kw):
    args = dict(max_tokens=64, max_rows=4, max_blocks=16, tail_blocks=2, device=torch.device("cpu"))
    args.update(kw)
    return StepInputs(**args)


def _rows(t):
    return t.tolist() if t is not None else None


def test_a_mixed_step_fills_tokens_slots_and_tables():
    inputs = _inputs()
    decode = _req("a", [7], 5, [3, 9])  # position 5: block 9, offset 1 -> slot 37
    chunk = _req("b", [1, 2, 3, 4, 5], 2, [4, 6])  # positions 2..6
    step = inputs.prepare([decode, chunk], [0, 1], BS)
    assert step.input_ids.tolist() == [7, 1, 2, 3, 4, 5]
    assert step.positions.tolist() == [5, 2, 3, 4, 5, 6]
    assert step.slot_mapping.tolist() == [37, 18, 19, 24, 25, 26]
    assert step.decode_seq_lens.tolist() == [6]
    assert step.decode_block_tables[0, :2].tolist() == [3, 9]
    p = step.paged_prefills
    assert (p.query_starts.tolist(), p.query_lens.tolist(), p.context_lens.tolist(), p.max_query_len) == ([1], [5], [2], 5)
    assert p.block_tables[0, :2].tolist() == [4, 6]


def test_proposals_are_one_decode_row_each():
    step = _inputs().prepare([_req("a", [7], 6, [3, 9, 2], drafts=[8, 8])], [0], BS)
    assert step.input_ids.tolist() == [7, 8, 8]
    assert step.slot_mapping.tolist() == [38, 39, 8]
    assert step.decode_seq_lens.tolist() == [7, 8, 9]
    assert step.decode_block_tables[:, :3].tolist() == [[3, 9, 2]] * 3


def test_tables_change_by_appends_shrinks_preemption_and_eviction():
    inputs = _inputs(max_rows=2)
    blocks = [5, 6]
    table = lambda step: step.decode_block_tables[0, : len(blocks)].tolist()  # noqa: E731
    assert table(inputs.prepare([_req("a", [1], 7, blocks)], [0], BS)) == [5, 6]
    blocks = blocks + [11]  # a new block: one update
    assert table(inputs.prepare([_req("a", [1], 8, blocks)], [0], BS)) == [5, 6, 11]
    blocks = blocks[:2] + [12]  # proposal room given back and reallocated elsewhere
    assert table(inputs.prepare([_req("a", [1], 8, blocks)], [0], BS)) == [5, 6, 12]
    inputs.forget(["a"])  # preempted: starts over with other blocks
    blocks = [1, 2, 3]
    assert table(inputs.prepare([_req("a", [1], 8, blocks)], [0], BS)) == [1, 2, 3]
    # Four more requests through two rows' worth of room (2 x max_rows): the oldest rows are reused.
    for rid in "bcde":
        inputs.prepare([_req(rid, [1], 0, [int(ord(rid))])], [0], BS)
    step = inputs.prepare([_req("a", [1], 8, blocks)], [0], BS)  # "a" was evicted: rewritten whole
    assert table(step) == [1, 2, 3]


def test_padding_rows_write_nothing_and_read_one_token():
    step = _inputs().prepare([_req("a", [7], 5, [3, 9])], [0], BS, pad_decodes_to=4)
    assert step.input_ids.tolist() == [7, 0, 0, 0]
    assert step.slot_mapping.tolist() == [37, -1, -1, -1]
    assert step.decode_seq_lens.tolist() == [6, 1, 1, 1]
    # Every step padded to 4 rows reads the same addresses: what a CUDA graph of 4 rows captured.
    inputs = _inputs()
    captured = inputs.prepare([], [], BS, pad_decodes_to=4)
    later = inputs.prepare([_req("b", [3], 2, [1])], [0], BS, pad_decodes_to=4)
    for name in ("input_ids", "positions", "slot_mapping", "decode_block_tables", "decode_seq_lens"):
        assert getattr(later, name).data_ptr() == getattr(captured, name).data_ptr(), name
    assert later.slot_mapping.tolist() == [6, -1, -1, -1]


def test_a_step_larger_than_the_buffers_does_not_fit():
    """The runner then builds that step's tensors alone (a draft model's first catch-up
    over a whole context can exceed the token budget the buffers were sized for)."""
    inputs = _inputs(max_tokens=8, max_rows=2, max_blocks=3)
    assert inputs.fits([_req("a", [1] * 8, 0, [1, 2])])
    assert not inputs.fits([_req("a", [1] * 9, 0, [1, 2, 3])])  # tokens
    assert not inputs.fits([_req(r, [1], 3, [1]) for r in "abc"])  # decode rows
    assert not inputs.fits([_req("a", [1], 12, [1, 2, 3, 4])])  # table width
