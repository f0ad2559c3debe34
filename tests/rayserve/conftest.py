"""One local Ray cluster (head + worker node, one CPU each) for all the Ray Serve tests."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is the `ray` extra: pip install 'tokenmill[ray]'")

from .harness import RayCluster  # noqa: E402


@pytest.fixture(scope="package")
def cluster():
    c = RayCluster(cpus_per_node=1)
    try:
        yield c
    finally:
        c.stop()
