"""Every replica's Prometheus metrics, labelled by replica, behind the ingress's `/metrics`.

Each engine replica serves its own registry (the one `tokenmill serve` has) on a port of its
node and enters its URL in a directory actor. The ingress's `/metrics` scrapes them all and
returns one exposition with a `replica` label on every sample, so one Prometheus target sees
every replica, including ones on other nodes and ones that come and go with autoscaling.
A replica that refuses the connection is gone (killed, scaled down) and leaves the directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import aiohttp
import prometheus_client
import ray
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

logger = logging.getLogger("tokenmill.ray")

REPLICA_LABEL = "replica"
SCRAPE_TIMEOUT_S = 2.0


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    """replica id -> its metrics URL; one per Serve application."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}

    def register(self, replica_id: str, url: str) -> None:
        self._urls[replica_id] = url

    def unregister(self, replica_id: str) -> None:
        self._urls.pop(replica_id, None)

    def urls(self) -> dict[str, str]:
        return dict(self._urls)


def directory(app_name: str):
    """The application's directory actor, created by whoever asks first. Detached: it must
    outlive any one replica; `tokenmill serve --ray` kills it when it deletes the app."""
    return ReplicaDirectory.options(name=f"tokenmill-replica-directory:{app_name}", namespace="serve",
                                    get_if_exists=True, lifetime="detached").remote()


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


async def federate(directory_actor, session: aiohttp.ClientSession, own: CollectorRegistry) -> bytes:
    """The ingress's `/metrics`: its own registry, then every replica's samples with their label."""
    urls: dict[str, str] = await directory_actor.urls.remote()

    async def scrape(replica_id: str, url: str) -> tuple[str, str | None]:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as r:
                return replica_id, await r.text()
        except aiohttp.ClientConnectorError:
            logger.info("replica %s no longer answers at %s: dropped from /metrics", replica_id, url)
            directory_actor.unregister.remote(replica_id)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.warning("could not scrape replica %s at %s: %r", replica_id, url, e)
        return replica_id, None

    families: dict = {}
    for replica_id, text in await asyncio.gather(*(scrape(r, u) for r, u in sorted(urls.items()))):
        if text is not None:
            relabel(text, replica_id, families)
    merged = CollectorRegistry()
    merged.register(_Families(families.values()))
    return prometheus_client.generate_latest(own) + prometheus_client.generate_latest(merged)
