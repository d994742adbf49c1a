"""Batched Lua script calls against a real Redis: one pipeline per tick, NOSCRIPT, failures."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway.scripts import ScriptBatcher

pytestmark = pytest.mark.integration

COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL = "return redis.error_reply('NOPE ' .. ARGV[1])"


class CountingBatcher(ScriptBatcher):
    """Counts the pipelines actually sent."""

    pipelines = 0

    async def _execute(self, batch):
        self.pipelines += 1
        return await super()._execute(batch)


@pytest.fixture
async def redis(redis_url):
    client = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    yield client
    await client.aclose()


async def test_concurrent_calls_share_one_pipeline_and_get_their_own_results(redis):
    batcher = CountingBatcher(redis)
    count = batcher.register(COUNT)
    results = await asyncio.gather(*(count(["n"], [1]) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    assert batcher.pipelines <= 2  # the first sends NOSCRIPT-free after loading: 1 or 2
    before = batcher.pipelines
    assert await count(["n"], [10]) == 60  # alone: one pipeline of one
    assert batcher.pipelines == before + 1


async def test_calls_made_while_a_pipeline_is_in_flight_go_out_together_next(redis):
    batcher = CountingBatcher(redis)
    count = batcher.register(COUNT)
    assert await count(["g"], [0]) == 0  # loads the script
    before = batcher.pipelines
    first = count(["g"], [1])
    for _ in range(3):  # the send is scheduled, then its task starts: now in flight
        await asyncio.sleep(0)
    assert batcher.pipelines == before + 1 and not first.done()
    rest = [count(["g"], [1]) for _ in range(20)]
    assert sorted(await asyncio.gather(first, *rest)) == list(range(1, 22))
    assert batcher.pipelines == before + 2


async def test_scripts_are_loaded_again_after_a_flush(redis):
    batcher = CountingBatcher(redis)
    count = batcher.register(COUNT)
    assert await count(["k"], [1]) == 1
    await redis.script_flush()
    assert await asyncio.gather(count(["k"], [1]), count(["k"], [1])) in ([2, 3], [3, 2])
    assert int(await redis.get("k")) == 3  # the refused calls ran exactly once


async def test_an_error_reaches_only_its_caller(redis):
    batcher = ScriptBatcher(redis)
    count, fail = batcher.register(COUNT), batcher.register(FAIL)
    ok, bad = await asyncio.gather(count(["e"], [5]), fail([], ["x"]), return_exceptions=True)
    assert ok == 5
    assert isinstance(bad, ResponseError) and "NOPE x" in str(bad)


async def test_redis_down_fails_every_caller(own_redis):
    server = own_redis()
    client = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        batcher = ScriptBatcher(client)
        count = batcher.register(COUNT)
        assert await count(["d"], [1]) == 1
        server.stop()
        results = await asyncio.gather(*(count(["d"], [1]) for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisError) for r in results), results
        server.start()
        assert await count(["d"], [1]) == 1  # a fresh (empty) Redis: works again
    finally:
        await client.aclose()
