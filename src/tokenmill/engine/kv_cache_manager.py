"""KVCacheManager: per-request block tables on top of the BlockPool, and prefix lookup."""

from __future__ import annotations

from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.request import Request


class KVCacheManager:
    """Owns the mapping request -> block ids. Answers "can I?" by returning None."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[int]] = {}
        self._num_hashed_blocks: dict[str, int] = {}  # leading blocks already put in the cache
        # Prefix-cache counters in tokens, as vLLM's prefix_cache_queries/hits.
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of `request`, in whole blocks.

        The last token is never served from cache: its logits are needed to sample.

        Returns:
            (block ids, number of tokens they hold).
        """
        # Prompt logprobs need every prompt position computed, so skip the cache then.
        if not self.enable_caching or request.params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not every retry while it waits for room)."""
        self.prefix_queries += num_queried_tokens
        self.prefix_hits += num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_block_ids: list[int] | None = None
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens of `request`.

        Args:
            request: its `num_computed_tokens` does not yet include the cached prefix.
            num_new_tokens: tokens to compute this step.
            computed_block_ids: cached prefix blocks from `get_computed_blocks` (first
                schedule only); they are referenced, not recomputed.
        Returns:
            The newly allocated block ids, or None (nothing changed) if the pool is short.
        """
        computed_block_ids = computed_block_ids or []
        blocks = self.req_blocks.get(request.request_id, [])
        num_tokens = request.num_computed_tokens + len(computed_block_ids) * self.block_size + num_new_tokens
        num_needed = -(-num_tokens // self.block_size) - len(blocks) - len(computed_block_ids)
        # Cached blocks nobody references sit in the free queue; taking them shrinks it.
        num_reclaimed = sum(1 for b in computed_block_ids if self.pool.ref_counts[b] == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimed:
            return None
        # Reference the prefix first so allocation cannot evict it.
        self.pool.touch(computed_block_ids)
        new_ids = self.pool.allocate(max(num_needed, 0)) or []
        self.req_blocks[request.request_id] = blocks + computed_block_ids + new_ids
        if computed_block_ids:
            self._num_hashed_blocks[request.request_id] = len(computed_block_ids)
        return new_ids

    def cache_blocks(self, request: Request) -> None:
        """Publish the request's newly completed full blocks to the prefix cache."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        start = self._num_hashed_blocks.get(request.request_id, 0)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_hashed_blocks[request.request_id] = max(start, num_full)

    def free_unused_blocks(self, request: Request) -> None:
        """Give back the blocks past the request's computed tokens (as after a step
        without proposals): room that was allotted to proposed tokens the target rejected
        (never cached: not full of verified tokens)."""
        blocks = self.req_blocks.get(request.request_id, [])
        num_needed = -(-request.num_computed_tokens // self.block_size)
        if len(blocks) > num_needed:
            self.pool.free(blocks[num_needed:][::-1])
            del blocks[num_needed:]

    def free(self, request: Request) -> None:
        """Release all of the request's blocks (tail first, so the tail is evicted first)."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_hashed_blocks.pop(request.request_id, None)
        self.pool.free(blocks[::-1])

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])
