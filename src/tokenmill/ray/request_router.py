"""Ray Serve's custom request router running tokenmill's routing policy (gateway/routing.py,
the same `Router` the gateway uses: prefix-cache aware under bounded loads).

Serve asks `choose_replicas` for ranked lists of candidates and probes them in order; a
replica that is full (at `max_ongoing_requests`) refuses and the next rank is tried. Ranks
here: [the policy's choice], then two other replicas at random (Serve's power of two
choices, which picks the shorter queue of the two). Requests without a routing key (GET
/v1/models) go straight to power of two choices.

The load the policy bounds is this router's own count of requests in flight per replica,
kept by (replica, request id) from Serve's two callbacks, which can come in either order: a
short request's completion can arrive before `on_request_routed` (the router's coroutine
resumes after the replica has already answered), and Serve also reports completions of
requests a replica refused (never routed there). Such completions are remembered (a bounded
number), so a late `on_request_routed` finds its request already done instead of counting
it forever. Each ingress replica has its own view, as each gateway replica does.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tokenmill.gateway.routing import Candidate, Router, RoutingConfig

# Completions seen before (or without) their on_request_routed; refused requests' are never
# claimed, so the oldest are dropped. A request is routed within seconds of completing.
UNROUTED_COMPLETIONS_KEPT = 10_000


def routing_text_of(pending_request: PendingRequest | None) -> str:
    """The routing key the ingress attached to the call (HTTPCall.routing_text), else ""."""
    if pending_request is None or not pending_request.args:
        return ""
    return getattr(pending_request.args[0], "routing_text", "") or ""


class PrefixAwareRequestRouter(RequestRouter):
    """`request_router_kwargs` are RoutingConfig's fields (policy, load_factor, block_chars...)."""

    # Serve's first queue-length probe waits 0.1 s: a replica busy with a decode step (its
    # event loop waits on the engine thread's GIL) misses it on a 2-core machine, and the
    # request, with its cached prefix, goes to the second rank. Power of two choices loses
    # nothing by moving on; a cache-aware choice loses the cache. Serve's own maximum.
    queue_len_response_deadline_s = RequestRouter.max_queue_len_response_deadline_s

    def initialize_state(self, **routing_kwargs) -> None:
        self._policy = Router(RoutingConfig(**routing_kwargs))
        self._in_flight: Counter[ReplicaID] = Counter()
        self._routed: set[tuple[ReplicaID, str]] = set()  # (replica, internal request id) counted
        self._completed_unrouted: OrderedDict[tuple[ReplicaID, str], None] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Without mixins nothing else sets it: back off between rounds instead of spinning
            # while every replica is full.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        text = routing_text_of(pending_request)
        if not text or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        # Remembered in on_request_routed, once a replica took it: the choice may be refused.
        name = self._policy.choose(text, [Candidate(n, self._in_flight[r.replica_id]) for n, r in by_name.items()],
                                   remember=False)
        chosen = by_name[name]
        others = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], random.sample(others, min(2, len(others)))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._policy.remember(routing_text_of(pending_request), replica_id.unique_id)
        key = (replica_id, pending_request.metadata.internal_request_id)
        if key in self._completed_unrouted:  # it finished before Serve told us where it went
            del self._completed_unrouted[key]
            return
        self._routed.add(key)
        self._in_flight[replica_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        key = (replica_id, internal_request_id)
        if key not in self._routed:  # routed later, or refused by a full replica: never counted
            self._completed_unrouted[key] = None
            if len(self._completed_unrouted) > UNROUTED_COMPLETIONS_KEPT:
                self._completed_unrouted.popitem(last=False)
            return
        self._routed.remove(key)
        if self._in_flight[replica_id] > 1:
            self._in_flight[replica_id] -= 1
        else:
            del self._in_flight[replica_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id, None)
        self._routed = {key for key in self._routed if key[0] != replica_id}
