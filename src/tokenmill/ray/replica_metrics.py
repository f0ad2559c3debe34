"""Every replica's Prometheus metrics, labelled by replica, behind the ingress's `/metrics`.

Each engine replica serves its own registry (the one `tokenmill serve` has) on a port of its
node and enters its URL in a directory actor, again at every health check (so a directory
that was restarted fills up again). The ingress's `/metrics` scrapes them all and returns
one exposition with a `replica` label on every sample: one Prometheus target sees every
replica, including ones on other nodes and ones that come and go with autoscaling. A replica
that refuses the connection is gone (killed, scaled down) and leaves the directory; one not
heard from for `ENTRY_TTL_S` (its node died) is dropped too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import aiohttp
import prometheus_client
import ray
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import exceptions as ray_exceptions

logger = logging.getLogger("tokenmill.ray")

REPLICA_LABEL = "replica"
SCRAPE_TIMEOUT_S = 2.0
# Replicas re-register at each Serve health check (every 10 s by default).
ENTRY_TTL_S = 60.0


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    """replica id -> its metrics URL; one per Serve application."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, float]] = {}  # replica id -> (url, last registered, monotonic s)

    def register(self, replica_id: str, url: str) -> None:
        self._entries[replica_id] = (url, time.monotonic())

    def unregister(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    def urls(self) -> dict[str, str]:
        now = time.monotonic()
        self._entries = {r: e for r, e in self._entries.items() if now - e[1] < ENTRY_TTL_S}
        return {r: url for r, (url, _) in self._entries.items()}


def directory(app_name: str):
    """The application's directory actor, created by whoever asks first. Detached: it must
    outlive any one replica. Killed by `serve.shutdown()` (registered with Serve's controller,
    as Ray's LLM router registers its prefix tree) or when `tokenmill serve --ray` deletes the app."""
    actor = ReplicaDirectory.options(name=directory_name(app_name), namespace="serve",
                                     get_if_exists=True, lifetime="detached").remote()
    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        controller._register_shutdown_cleanup_actor.remote(actor)  # idempotent
    except (ImportError, ValueError, AttributeError):  # another Serve version: the actor lingers
        logger.debug("could not register the replica directory for cleanup at serve.shutdown()")
    return actor


def directory_name(app_name: str) -> str:
    return f"tokenmill-replica-directory:{app_name}"


def serve_registry(registry: CollectorRegistry, host: str) -> str:
    """Serve `registry` on a free port of `host` (a thread); returns its /metrics URL."""
    server, _ = prometheus_client.start_http_server(0, addr=host, registry=registry)
    return f"http://{host}:{server.server_port}/metrics"


class _Families:
    """Parsed families as a collector, so prometheus_client renders the merged exposition."""

    def __init__(self, families: Iterable) -> None:
        self._families = list(families)

    def collect(self):
        return self._families


def relabel(text: str, replica_id: str, into: dict) -> None:
    """Add `replica=<id>` to every sample of an exposition and merge its families into `into`
    (name -> family), so each family is written once with the samples of all replicas."""
    for family in text_string_to_metric_families(text):
        samples = [Sample(s.name, {**s.labels, REPLICA_LABEL: replica_id}, s.value, s.timestamp, s.exemplar)
                   for s in family.samples]
        merged = into.get(family.name)
        if merged is None:
            family.samples = samples
            into[family.name] = family
        else:
            merged.samples.extend(samples)


def merge(own: CollectorRegistry, texts: dict[str, str]) -> bytes:
    """`own` registry's exposition, then every replica's samples with their label."""
    families: dict = {}
    for replica_id, text in sorted(texts.items()):
        relabel(text, replica_id, families)
    merged = CollectorRegistry()
    merged.register(_Families(families.values()))
    return prometheus_client.generate_latest(own) + prometheus_client.generate_latest(merged)


class ReplicaDirectoryClient:
    """The ingress's side: scrape the replicas the directory lists."""

    def __init__(self, app_name: str) -> None:
        self._app_name = app_name
        self._actor = directory(app_name)

    async def federate(self, session: aiohttp.ClientSession, own: CollectorRegistry) -> bytes:
        try:
            urls: dict[str, str] = await self._actor.urls.remote()
        except ray_exceptions.RayActorError:  # the directory died: a new one fills up at health checks
            self._actor = directory(self._app_name)
            urls = await self._actor.urls.remote()

        async def scrape(replica_id: str, url: str) -> tuple[str, str | None]:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as r:
                    return replica_id, await r.text()
            except aiohttp.ClientConnectorError:
                logger.info("replica %s no longer answers at %s: dropped from /metrics", replica_id, url)
                self._actor.unregister.remote(replica_id)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                logger.warning("could not scrape replica %s at %s: %r", replica_id, url, e)
            return replica_id, None

        texts = {r: t for r, t in await asyncio.gather(*(scrape(r, u) for r, u in urls.items())) if t is not None}
        # Parsing and rendering every replica's exposition takes milliseconds: off the event
        # loop that relays every stream.
        return await asyncio.to_thread(merge, own, texts)
