"""Scheduler: budgets, chunked prefill, FCFS admission, preemption order, aborts."""

from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import EngineCoreRequest, Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import ModelRunnerOutput
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_scheduler(num_blocks=16, max_tokens_per_step=64, max_num_seqs=8, max_model_len=64):
    kv = KVCacheManager(num_blocks, BS)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_per_step, max_model_len=max_model_len)
    return Scheduler(cfg, kv)


def add(s: Scheduler, rid: str, num_prompt: int, max_tokens: int = 8, **params) -> Request:
    params.setdefault("ignore_eos", True)
    req = Request(
        # Distinct tokens per request, so no accidental prefix-cache hits.
        EngineCoreRequest(rid, [1000 * ord(rid[0]) + i for i in range(num_prompt)], SamplingParams(max_tokens=max_tokens, **params)),
        max_tokens=max_tokens,
        block_size=BS,
    )
    s.add_request(req)
    return req


def step(s: Scheduler, token: int = 5):
    out = s.schedule()
    sampled = {r.request_id: [token] for r in out.scheduled if r.needs_sample}
    return out, s.update_from_output(out, ModelRunnerOutput(sampled, {}, {}))


def test_decodes_first_then_prefill_chunks_within_budget():
    s = make_scheduler(max_tokens_per_step=10)
    add(s, "a", 6)
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids)) for r in out.scheduled] == [("a", 6)]
    add(s, "b", 20)
    out, _ = step(s)
    # a decodes (1 token) first; b gets the remaining 9 of the budget as a chunk.
    assert [(r.request_id, len(r.token_ids), r.needs_sample) for r in out.scheduled] == [
        ("a", 1, True),
        ("b", 9, False),
    ]
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids), r.num_computed_tokens) for r in out.scheduled] == [
        ("a", 1, 7),
        ("b", 9, 9),
    ]
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids), r.needs_sample) for r in out.scheduled] == [
        ("a", 1, True),
        ("b", 2, True),
    ]


def test_two_waiting_requests_chunked_in_one_step():
    s = make_scheduler(max_tokens_per_step=12)
    add(s, "a", 8)
    add(s, "b", 8)
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids)) for r in out.scheduled] == [("a", 8), ("b", 4)]


def test_max_num_seqs_limits_admission():
    s = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, 4)
    out, _ = step(s)
    assert [r.request_id for r in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_block_tables_are_exact():
    s = make_scheduler()
    add(s, "a", 6)
    add(s, "b", 3)
    out, _ = step(s)
    assert {r.request_id: r.block_ids for r in out.scheduled} == {"a": [0, 1], "b": [2]}
    step(s)  # a: 7 tokens, b: 4 tokens -> b's first block just filled
    out, _ = step(s)
    assert {r.request_id: r.block_ids for r in out.scheduled} == {"a": [0, 1], "b": [2, 3]}


def test_preempts_newest_and_resumes_it_with_outputs_kept():
    # 4 blocks = 16 tokens. a and b (7-token prompts) fill 2 blocks each; their 8th
    # token still fits, the 9th needs a third block, so b (newest) is preempted.
    s = make_scheduler(num_blocks=4, max_model_len=16)
    a = add(s, "a", 7, max_tokens=6)
    b = add(s, "b", 7, max_tokens=6)
    step(s)
    assert s.kv.pool.num_free_blocks == 0
    step(s)  # position 7: still in the second block
    out, _ = step(s)  # position 8: a needs a third block
    assert out.preempted_req_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [5, 5]  # generated tokens survive preemption
    assert s.num_preemptions == 1
    assert [r.request_id for r in s.waiting] == ["b"]
    # Run to completion: nothing is lost, everything is freed.
    for _ in range(40):
        if not s.has_unfinished_requests():
            break
        step(s)
    assert not s.has_unfinished_requests()
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert s.kv.pool.num_free_blocks == 4


def test_abort_frees_blocks_immediately():
    s = make_scheduler(num_blocks=8)
    add(s, "a", 10)
    add(s, "b", 3)
    step(s)
    assert s.kv.pool.num_free_blocks == 4
    s.abort_requests(["a", "zzz"])  # unknown ids are ignored
    assert s.kv.pool.num_free_blocks == 7
    assert [r.request_id for r in s.running] == ["b"]
    s.abort_requests(["b"])
    assert s.kv.pool.num_free_blocks == 8 and not s.has_unfinished_requests()


def test_stop_conditions():
    s = make_scheduler()
    a = add(s, "a", 4, max_tokens=3)
    outs = []
    for _ in range(3):
        outs += step(s)[1]
    assert outs[-1].finish_reason == "length" and a.num_output_tokens == 3

    s = make_scheduler()
    params = SamplingParams(max_tokens=8, stop_token_ids=[5])
    params.all_stop_token_ids = {2, 5}
    s.add_request(Request(EngineCoreRequest("b", [10, 11], params), max_tokens=8, block_size=BS))
    _, outs = step(s, token=5)
    assert (outs[0].finish_reason, outs[0].stop_reason) == ("stop", 5)

    s = make_scheduler()
    params = SamplingParams(max_tokens=8, min_tokens=2)
    params.all_stop_token_ids = {2}
    s.add_request(Request(EngineCoreRequest("c", [10, 11], params), max_tokens=8, block_size=BS))
    _, outs = step(s, token=2)
    assert outs[0].finish_reason is None  # below min_tokens
    _, outs = step(s, token=2)
    assert (outs[0].finish_reason, outs[0].stop_reason) == ("stop", None)


def test_n_children_wait_for_leader_prefill_then_hit_cache():
    s = make_scheduler(max_tokens_per_step=8)
    prompt = list(range(10, 22))  # 12 tokens = 3 blocks
    reqs = []
    for i in range(3):
        r = Request(
            EngineCoreRequest(f"{i}_x", prompt, SamplingParams(max_tokens=4), group_leader_id=None if i == 0 else "0_x"),
            max_tokens=4,
            block_size=BS,
        )
        s.add_request(r)
        reqs.append(r)
    out, _ = step(s)
    assert [r.request_id for r in out.scheduled] == ["0_x"]  # siblings wait for the leader
    out, _ = step(s)
    assert [r.request_id for r in out.scheduled] == ["0_x"]  # leader's second chunk
    out, _ = step(s)
    ids = [r.request_id for r in out.scheduled]
    assert ids == ["0_x", "1_x", "2_x"]
    # Siblings reuse the leader's first two full blocks (the last prompt token is recomputed).
    assert reqs[1].num_cached_tokens == 8
    assert s.kv.block_ids("1_x")[:2] == s.kv.block_ids("0_x")[:2]
