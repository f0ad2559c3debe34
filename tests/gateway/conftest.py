"""Fixtures of the gateway tests: real Redis and PostgreSQL servers, one each per session.

Without the Debian packages (redis-server, postgresql) the tests that need them skip.
"""

from __future__ import annotations

import pytest
import redis

from tests.services import ServiceUnavailable, postgres_server, redis_server


@pytest.fixture(scope="session")
def redis_url():
    """URL of a Redis server shared by the session: "redis://127.0.0.1:PORT/0"."""
    # ServiceUnavailable can only come from starting the server, before the yield.
    try:
        with redis_server() as url:
            yield url
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres_url():
    """URL of database tokenmill on a PostgreSQL server shared by the session."""
    try:
        with postgres_server() as url:
            yield url
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def clean_redis(redis_url):
    """`redis_url`, emptied first: each test starts from no keys, whatever ran before."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    return redis_url
