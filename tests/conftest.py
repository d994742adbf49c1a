"""Session services for integration tests: our own Tansu broker and, unless given, redis-server."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from tests.services import POSTGRES_URL, RedisServer, TansuBroker, ensure_postgres


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


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """A PostgreSQL server URL (the machine's, started if needed) with admin rights."""
    url = os.environ.get("SLUICE_TEST_POSTGRES_URL", POSTGRES_URL)
    ensure_postgres(url)
    return url


@pytest.fixture
async def postgres_url(postgres_server):
    """A new, empty database for this test, dropped afterwards."""
    import asyncpg

    name = f"sluice_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_server.rpartition("/")
    yield f"{base}/{name}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """Each storage backend in turn: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sluice.db"
    return request.getfixturevalue("postgres_url")
