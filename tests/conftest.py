"""Session services for integration tests: our own Tansu broker and, unless given, redis-server.

Fixtures:
  kafka          session: a TansuBroker of our own on a free port (never a developer's broker)
  redis_service  session: $SLUICE_TEST_REDIS_URL if set, else our own RedisServer; has ``.url``
  redis_url      per test: the session Redis URL, FLUSHDB'd first
  own_broker     per test: factory ``own_broker(port=None) -> TansuBroker`` to stop/pause/restart
  own_redis      per test: factory ``own_redis(port=None) -> RedisServer``, likewise
Services a test started are stopped in teardown, whether it passed or not.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest
import redis

from tests.services import (
    POSTGRES_URL,
    RedisServer,
    ServiceError,
    TansuBroker,
    ensure_postgres,
    tansu_binary,
)


def _require_tansu() -> None:
    """Integration tests fail, loudly and at once, when there is no broker to run."""
    try:
        tansu_binary()
    except ServiceError as exc:
        problem = str(exc)
    else:
        return
    pytest.fail(f"integration tests need the Tansu broker: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def kafka():
    """A Tansu broker on a free port for the whole session (never a developer's broker)."""
    _require_tansu()
    with TansuBroker() as broker:
        yield broker


class _GivenRedis:
    def __init__(self, url: str):
        self.url = url

    def __repr__(self) -> str:
        return f"<given Redis {self.url}>"


@pytest.fixture(scope="session")
def redis_service():
    """The session Redis: $SLUICE_TEST_REDIS_URL if set, else a redis-server of our own."""
    given = os.environ.get("SLUICE_TEST_REDIS_URL")
    if given:
        yield _GivenRedis(given)
        return
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_service) -> str:
    """The session Redis, emptied so each test starts from nothing."""
    client = redis.Redis.from_url(redis_service.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_service.url


def _own(kind):
    """Factory fixture body: services of ``kind`` this test may stop, pause and restart."""
    with contextlib.ExitStack() as stack:  # closes every one even if some close fails

        def make(port: int | None = None):
            service = kind()
            stack.callback(service.close)
            return service.start(port)

        yield make


@pytest.fixture
def own_broker():
    """Factory for a Tansu broker of this test's own."""
    _require_tansu()
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
