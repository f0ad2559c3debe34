"""Which replica serves a request: the routing policy, pure (no I/O, no clocks).

The gateway and the Ray Serve router both call `Router.choose` with the request's routing
text and the candidates' current loads.

Policies:
- `least_requests`: fewest outstanding requests per unit of weight.
- `prefix` (default): prefix-cache-aware with bounded loads. The routing text (the prompt, or
  the chat messages in order) is cut into blocks of `block_chars` characters whose hashes
  are chained, as the engines chain their KV blocks, so a block hash stands for the whole
  prefix up to it. An LRU index remembers which replica each prefix block was last sent
  to; a request goes to the replica holding its longest remembered prefix. A prefix seen
  nowhere goes to its place on a consistent-hash ring (so every gateway replica sends it
  to the same replica without sharing state). In both cases a replica is taken only if it
  is under its bounded load (consistent hashing with bounded loads, Mirrokni et al.):
  outstanding + 1 <= ceil(load_factor * (total outstanding + 1) * its weight share), so a
  hot prefix spills to the next replica instead of piling onto one.
- session affinity (either policy with an affinity key, from a header or the request's
  `user`): the key alone is the routing text, under the same bound.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("prefix", "least_requests")


@dataclass(frozen=True)
class Candidate:
    """A replica that can take the request now, and its load."""

    name: str
    outstanding: int
    weight: float = 1.0


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "prefix"
    load_factor: float = 1.25  # c in the bound: a replica takes at most c x its fair share
    block_chars: int = 64  # characters per prefix block (~16 tokens)
    max_blocks: int = 128  # blocks hashed per request (the first 8 KiB of text)
    index_capacity: int = 200_000  # prefix blocks remembered (LRU): bounded memory
    virtual_nodes: int = 64  # ring points per unit of weight

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1 (1 = perfectly even), not {self.load_factor}")


def prefix_hashes(text: str, block_chars: int, max_blocks: int) -> list[bytes]:
    """Chained hashes of the text's full blocks (and of a shorter last block, so short prompts
    route too): hash i covers text[: (i + 1) * block_chars]."""
    h = hashlib.blake2b(digest_size=8)
    out = []
    for start in range(0, min(len(text), block_chars * max_blocks), block_chars):
        h.update(text[start:start + block_chars].encode("utf-8", "surrogatepass"))
        out.append(h.copy().digest())
    return out


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Router:
    """The policy and its memory (the prefix index and the hash ring)."""

    def __init__(self, config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()
        self._index: OrderedDict[bytes, str] = OrderedDict()  # prefix block hash -> replica
        self._ring: list[tuple[int, str]] = []
        self._ring_members: tuple[tuple[str, float], ...] = ()

    def choose(self, text: str, candidates: Sequence[Candidate], remember: bool = True) -> str:
        """The replica for a request whose routing text is `text` (may be empty). With
        `remember`, the prefix index records it; a caller that may end up elsewhere (Ray
        Serve's router: the choice can be refused) passes False and calls `remember` with
        the replica that took the request."""
        if not candidates:
            raise ValueError("no candidates to route to")
        if len(candidates) == 1:
            return candidates[0].name
        if self.config.policy == "least_requests" or not text:
            return least_loaded(candidates)
        blocks = prefix_hashes(text, self.config.block_chars, self.config.max_blocks)
        eligible = {c.name for c in under_bound(candidates, self.config.load_factor)}
        chosen = None
        for h in reversed(blocks):  # the longest remembered prefix on an eligible replica
            owner = self._index.get(h)
            if owner in eligible:
                chosen = owner
                break
        if chosen is None:
            chosen = self._ring_choice(blocks[0], candidates, eligible)
        if remember:
            self._remember(blocks, chosen)
        return chosen

    def remember(self, text: str, name: str) -> None:
        """Record that replica `name` took the request with routing text `text`."""
        if text and self.config.policy == "prefix":
            self._remember(prefix_hashes(text, self.config.block_chars, self.config.max_blocks), name)

    def _remember(self, blocks: list[bytes], name: str) -> None:
        index = self._index
        for h in blocks:
            index[h] = name
            index.move_to_end(h)
        while len(index) > self.config.index_capacity:
            index.popitem(last=False)

    def _ring_choice(self, key: bytes, candidates: Sequence[Candidate], eligible: set[str]) -> str:
        members = tuple(sorted((c.name, c.weight) for c in candidates))
        if members != self._ring_members:  # rebuilt only when the replica set changes
            self._ring = sorted((_point(f"{name}#{i}".encode()), name) for name, weight in members
                                for i in range(max(1, round(self.config.virtual_nodes * weight))))
            self._ring_members = members
        start = bisect.bisect(self._ring, (_point(key), ""))
        for i in range(len(self._ring)):
            name = self._ring[(start + i) % len(self._ring)][1]
            if name in eligible:
                return name
        return least_loaded(candidates)  # unreachable: someone is always under the bound

def least_loaded(candidates: Sequence[Candidate]) -> str:
    """Fewest outstanding per unit of weight; ties broken at random (no herd on the first)."""
    best = min(c.outstanding / c.weight for c in candidates)
    return random.choice([c.name for c in candidates if c.outstanding / c.weight == best])


def load_bound(candidate: Candidate, candidates: Sequence[Candidate], load_factor: float) -> int:
    """The most requests `candidate` may hold once this one is added."""
    total = sum(c.outstanding for c in candidates) + 1
    share = candidate.weight / sum(c.weight for c in candidates)
    return math.ceil(load_factor * total * share)


def under_bound(candidates: Sequence[Candidate], load_factor: float) -> list[Candidate]:
    """The candidates that may take one more request (never empty: the least loaded always
    can, since the bound is at least its fair share of the load plus this request)."""
    ok = [c for c in candidates if c.outstanding + 1 <= load_bound(c, candidates, load_factor)]
    if ok:
        return ok
    least = least_loaded(candidates)
    return [c for c in candidates if c.name == least]
