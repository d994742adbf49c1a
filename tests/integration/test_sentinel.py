"""REDIS_URL=redis+sentinel://: the gateway finds the primary through Sentinel and follows a
failover on real redis-server processes (a primary, its replica and one Sentinel)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
import pytest
import redis

from tests.integration.test_push import ITEMS
from tests.services import RedisSentinel, RedisServer

pytestmark = pytest.mark.integration


def _linked(replica: RedisServer) -> bool:
    client = redis.Redis(host="127.0.0.1", port=replica.port, socket_timeout=0.5)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} after {timeout} s"
        time.sleep(0.05)


async def _settled(client: redis.Redis, key: str, what: str) -> None:
    """Wait (without blocking the gateway's event loop) until ``key``'s answer is stored."""
    deadline = time.monotonic() + 5
    while [client.hget(k, "state") for k in client.keys(f"*{key}*")] != [b"done"]:
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.fixture
def sentinel_group():
    """A primary, its replica (linked) and a Sentinel that knows both."""
    with contextlib.ExitStack() as stack:
        primary = RedisServer().start()
        stack.callback(primary.close)
        stack.callback(lambda: primary.running and primary.resume())
        replica = RedisServer(replica_of=primary.port).start()
        stack.callback(replica.close)
        _wait(lambda: _linked(replica), 10, "the replica is not linked")
        sentinel = RedisSentinel(primary.port).start()
        stack.callback(sentinel.close)
        yield primary, replica, sentinel


async def test_the_gateway_follows_a_sentinel_failover(sentinel_group, make_gateway):
    # sentinel_group first: torn down after the gateway, which would otherwise spend its
    # shutdown trying to reach a stopped Redis
    primary, replica, sentinel = sentinel_group
    gateway = await make_gateway(redis=sentinel.url)
    body = orjson.dumps(ITEMS)
    first = await gateway.post(body, **{"Idempotency-Key": "before-failover"})
    assert first.status == 202
    answer = await first.read()
    stored = redis.Redis(host="127.0.0.1", port=replica.port)
    await _settled(stored, "before-failover", "the answer is not on the replica")

    primary.pause()  # hung, or cut off: its connections stay open and go silent
    deadline = time.monotonic() + 20
    while sentinel.primary() != ("127.0.0.1", replica.port):
        assert time.monotonic() < deadline, "Sentinel did not promote the replica in 20 s"
        await asyncio.sleep(0.1)
    # the first request after the failover reaches the new primary: the gateway's pooled
    # connection to the old one times out, and its one retry asks Sentinel where to go
    resp = await gateway.post(body, **{"Idempotency-Key": "after-failover"})
    assert resp.status == 202, await resp.text()
    await _settled(stored, "after-failover", "the answer is not stored on the new primary")
    # the first answer was replicated before the failover: replayed, not published again
    replay = await gateway.post(body, **{"Idempotency-Key": "before-failover"})
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.read() == answer
    assert len(await gateway.published()) == 2
    stored.close()
