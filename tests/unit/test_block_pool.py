"""BlockPool and KVCacheManager: exact block ids, ref counts and eviction order."""

from __future__ import annotations

from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import EngineCoreRequest, Request
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(EngineCoreRequest(rid, tokens, SamplingParams(**params)), max_tokens=16, block_size=BS)


def test_allocate_takes_lowest_free_ids_in_order():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.ref_counts == [1, 1, 1, 1, 1, 0]
    assert pool.allocate(2) is None  # only one left: nothing taken
    assert pool.num_free_blocks == 1


def test_free_appends_in_given_order_and_reuses_lru_first():
    pool = BlockPool(4)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    pool.free(b[::-1])  # tail first: 3, 2
    pool.free(a[::-1])  # 1, 0
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.allocate(1) == [3]


def test_cached_block_survives_free_until_evicted():
    pool = BlockPool(3)
    ids = pool.allocate(2)  # [0, 1]
    pool.cache_block(0, 111)
    pool.cache_block(1, 222)
    pool.free([1, 0])
    assert pool.get_cached_block(111) == 0  # still findable while free
    pool.touch([0])  # a new request hits it
    assert pool.ref_counts[0] == 1 and 0 not in pool.free_block_ids()
    assert pool.allocate(2) == [2, 1]  # 1 is evicted (LRU) and loses its hash
    assert pool.get_cached_block(222) is None
    assert pool.get_cached_block(111) == 0
    assert ids == [0, 1]


def test_shared_block_ref_counts():
    pool = BlockPool(2)
    pool.allocate(1)  # [0]
    pool.touch([0])
    pool.touch([0])
    assert pool.ref_counts[0] == 3
    pool.free([0])
    pool.free([0])
    assert pool.num_free_blocks == 1  # still referenced once
    pool.free([0])
    assert pool.free_block_ids() == [1, 0]


def test_prefix_lookup_never_serves_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", list(range(8)))  # exactly two full blocks
    assert kv.allocate_slots(a, 8) == [0, 1]
    a.num_computed_tokens = 8
    kv.cache_blocks(a)
    b = make_request("b", list(range(8)))
    ids, num = kv.get_computed_blocks(b)
    # Both blocks are cached, but the last prompt token must be computed for its logits.
    assert (ids, num) == ([0], 4)
    c = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(c) == ([0, 1], 8)
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)  # counted on admission, by the scheduler


def test_allocate_with_prefix_hit_references_cached_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(10)))
    assert kv.allocate_slots(a, 10) == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_blocks(a)
    kv.free(a)
    assert kv.pool.free_block_ids() == [3, 2, 1, 0]
    b = make_request("b", list(range(8)) + [50, 51, 52])
    ids, num = kv.get_computed_blocks(b)
    assert (ids, num) == ([0, 1], 8)
    # 11 tokens need 3 blocks: 2 cached + 1 new, taken from the LRU head (3).
    assert kv.allocate_slots(b, 3, ids) == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.pool.ref_counts == [1, 1, 0, 1]


def test_allocate_counts_reclaimed_cached_blocks_against_free():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)  # [0, 1, 2]
    a.num_computed_tokens = 9
    kv.cache_blocks(a)
    kv.free(a)
    b = make_request("b", list(range(8)) + [7] * 8)  # 16 tokens: 4 blocks > pool
    ids, _ = kv.get_computed_blocks(b)
    assert ids == [0, 1]
    # 2 cached blocks are free (ref 0); reusing them leaves 1 free, 2 more are needed.
    assert kv.allocate_slots(b, 8, ids) is None
    assert kv.pool.ref_counts == [0, 0, 0]  # nothing changed


def test_no_prefix_reuse_when_caching_disabled_or_prompt_logprobs():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_blocks(a)
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    kv2 = KVCacheManager(num_blocks=8, block_size=BS)
    a2 = make_request("a", list(range(9)))
    kv2.allocate_slots(a2, 9)
    a2.num_computed_tokens = 9
    kv2.cache_blocks(a2)
    assert kv2.get_computed_blocks(make_request("c", list(range(9)), prompt_logprobs=1)) == ([], 0)
    assert kv2.get_computed_blocks(make_request("d", list(range(9))))[1] == 8


def test_block_hashes_are_chained():
    x = make_request("x", [1, 2, 3, 4, 5, 6, 7, 8])
    y = make_request("y", [9, 9, 9, 9, 5, 6, 7, 8])
    # Same second block of tokens, different history: different identity.
    assert x.block_hashes[1] != y.block_hashes[1]
    z = make_request("z", [1, 2, 3, 4, 5, 6, 7])
    assert z.block_hashes == x.block_hashes[:1]
    z.append_output_token(8)
    assert z.block_hashes == x.block_hashes
