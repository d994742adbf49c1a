"""Session services for integration tests: our own Tansu broker and, unless given, redis-server."""

from __future__ import annotations

import os

import pytest
import redis

from tests.services import RedisServer, TansuBroker


@pytest.fixture(scope="session")
def kafka():
    """A Tansu broker on a free port for the whole session (never a developer's broker)."""
    with TansuBroker() as broker:
        yield broker


class _GivenRedis:
    def __init__(self, url: str):
        self.url = url


@pytest.fixture(scope="session")
def redis_service():
    given = os.environ.get("SLUICE_TEST_REDIS_URL")
    if given:
        yield _GivenRedis(given)
        return
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_service) -> str:
    """The session Redis, emptied so each test starts from nothing."""
    client = redis.Redis.from_url(redis_service.url)
    client.flushdb()
    client.close()
    return redis_service.url


def _own(kind):
    """Factory fixture body: services of ``kind`` this test may stop, pause and restart."""
    started = []

    def make():
        service = kind().start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.close()


@pytest.fixture
def own_broker():
    """Factory for a Tansu broker of this test's own."""
    yield from _own(TansuBroker)


@pytest.fixture
def own_redis():
    """Factory for a redis-server of this test's own."""
    yield from _own(RedisServer)
