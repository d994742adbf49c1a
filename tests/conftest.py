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


@pytest.fixture
def own_broker():
    """Factory for a broker this test may stop, pause and restart."""
    brokers: list[TansuBroker] = []

    def make() -> TansuBroker:
        broker = TansuBroker().start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def own_redis():
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer().start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
