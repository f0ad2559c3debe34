"""BlockPool: owns every KV block id, its reference count and its prefix-cache hash."""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """Fixed pool of KV cache blocks.

    A block is in use while its ref count is > 0. Free blocks wait in an LRU queue
    (oldest-freed first out); a free block that still holds a full, hashed block of
    tokens stays findable by hash until it is reused, which is how a prefix survives
    its request. Allocation takes from the queue head and drops the old hash.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        # Free block ids in eviction order (head evicted first); values unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (for tests and debugging)."""
        return list(self._free)

    def get_cached_block(self, block_hash: bytes) -> int | None:
        """The block holding this hash, or None."""
        return self._hash_to_block.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` fresh blocks (ref count 1), or None if there are not enough."""
        if num_blocks > len(self._free):
            return None
        ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict_hash(block_id)
            self.ref_counts[block_id] = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Add a reference to each (cached) block, taking free ones off the free queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue tail
        in the order given (callers pass a request's blocks tail-first so that its last
        blocks, the least shareable, are evicted first)."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Record that `block_id` holds the full block identified by `block_hash`."""
        if not self.enable_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash in self._hash_to_block:
            return  # an identical block is already cached; keep the first one findable
        self.block_hashes[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id

    def _evict_hash(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            self.block_hashes[block_id] = None
            if self._hash_to_block.get(block_hash) == block_id:
                del self._hash_to_block[block_hash]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._hash_to_block.clear()
        self.block_hashes = [None] * self.num_blocks
        return True
