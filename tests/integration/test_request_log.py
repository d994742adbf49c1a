"""The per-connector request log in a real Redis: bounded, and nothing left behind by trimming.

The gateway writes an entry per request (a hash, an error list, a member of the connector's
sorted set); the workers add what they wrote to the same hash. An entry trimmed from the log
(beyond the newest N, or older than the maximum age) takes its keys with it, and a worker's
counts for a request that has no entry (not written yet, or trimmed) live only briefly.
"""

from __future__ import annotations

import time

import orjson
import pytest

from gateway.accounting import Accountant, RequestOutcome
from schemas import outcomes as o
from schemas import redis_client
from workers.accounting import BatchOutcome

pytestmark = pytest.mark.integration

CONNECTOR = "pos"
DAY_MS = 86_400_000


@pytest.fixture
async def redis(redis_url):
    client = redis_client.connect(redis_url, 2)
    yield client
    await client.aclose()


def outcome(request_id: str, received_at_ms: int | None = None) -> RequestOutcome:
    out = RequestOutcome("sales", CONNECTOR, request_id,
                         received_at_ms or int(time.time() * 1000), 202)
    out.received = out.accepted = 2
    return out


async def log_ids(redis) -> list[str]:
    return [m.decode() for m in await redis.zrange(o.connector_log_key(CONNECTOR), 0, -1)]


async def keys_of(redis, request_id: str) -> set[str]:
    """Which of a request's keys exist: 'entry' (its hash), 'errors' (its error list)."""
    found = set()
    if await redis.exists(o.request_key(CONNECTOR, request_id)):
        found.add("entry")
    if await redis.exists(o.request_errors_key(CONNECTOR, request_id)):
        found.add("errors")
    return found


async def worker_counts(redis, request_id: str, written: int, errors: int = 0,
                        received_at_ms: int | None = None) -> None:
    batch = BatchOutcome()
    batch.received_ms[(CONNECTOR, request_id)] = received_at_ms or int(time.time() * 1000)
    batch.requests[(CONNECTOR, request_id)][o.WRITTEN] += written
    for i in range(errors):
        batch.errors[(CONNECTOR, request_id)].append(orjson.dumps({"index": i}))
    await batch.write(redis, redis.register_script(o.ACCOUNT_SCRIPT),
                      redis.register_script(o.REQUESTS_SCRIPT), log_age_s=7 * 86_400)


async def test_entries_beyond_the_newest_n_are_trimmed_with_their_keys(redis):
    accountant = Accountant(redis, log_max_entries=3)
    now = int(time.time() * 1000)
    for i in range(5):
        accountant.record(outcome(f"r{i}", now + i))
    await worker_counts(redis, "r0", written=2, errors=1,  # counted before it is logged
                        received_at_ms=now)
    await accountant.flush()
    assert await log_ids(redis) == ["r2", "r3", "r4"]
    assert [await keys_of(redis, f"r{i}") for i in range(5)] == [
        set(), set(), {"entry"}, {"entry"}, {"entry"}]
    # later flushes trim one for one: the log and its hashes stay at N
    for i in range(5, 105):
        accountant.record(outcome(f"r{i}", now + i))
        if i % 10 == 0:
            await accountant.flush()
    await accountant.flush()
    assert await log_ids(redis) == ["r102", "r103", "r104"]
    assert len(await redis.keys(o.request_key(CONNECTOR, "*"))) == 3


async def test_a_flush_of_thousands_of_entries_writes_and_trims_them_all(redis):
    # beyond one slice of the script's batched ZADD and DEL (1,000 values: 500 entries), as
    # after a Redis outage, when the whole backlog of outcomes is flushed at once
    accountant = Accountant(redis, log_max_entries=100)
    now = int(time.time() * 1000)
    for i in range(1_501):
        accountant.record(outcome(f"a{i}", now + i))
    await worker_counts(redis, "a7", written=2, errors=1, received_at_ms=now + 7)
    await accountant.flush()
    assert await log_ids(redis) == [f"a{i}" for i in range(1_401, 1_501)]
    assert len(await redis.keys(o.request_key(CONNECTOR, "*"))) == 100
    for i in range(1_501):
        accountant.record(outcome(f"b{i}", now + 10_000 + i))
    await accountant.flush()
    assert await log_ids(redis) == [f"b{i}" for i in range(1_401, 1_501)]
    assert sorted(await redis.keys(o.request_key(CONNECTOR, "*"))) == sorted(
        o.request_key(CONNECTOR, f"b{i}").encode() for i in range(1_401, 1_501))


async def test_entries_older_than_the_maximum_age_are_trimmed_with_their_keys(redis):
    accountant = Accountant(redis, log_max_entries=100, log_max_age_s=86_400)
    now = int(time.time() * 1000)
    accountant.record(outcome("old", now - 2 * DAY_MS))
    accountant.record(outcome("new", now))
    await accountant.flush()
    assert await log_ids(redis) == ["new"]
    assert await keys_of(redis, "old") == set()
    assert 0.99 * DAY_MS < await redis.pttl(o.request_key(CONNECTOR, "new")) <= DAY_MS


async def test_a_worker_counting_before_the_entry_is_written_gets_the_entry_ttl_later(redis):
    entry, errors = o.request_key(CONNECTOR, "r1"), o.request_errors_key(CONNECTOR, "r1")
    await worker_counts(redis, "r1", written=1, errors=2)  # before the gateway's flush
    for key in (entry, errors):
        assert 0 < await redis.pttl(key) <= o.ORPHAN_TTL_MS
    accountant = Accountant(redis, log_max_age_s=86_400)
    accountant.record(outcome("r1"))
    await accountant.flush()
    for key in (entry, errors):
        assert await redis.pttl(key) > 0.99 * DAY_MS
    stored = await redis.hgetall(entry)
    assert stored[b"written"] == b"1" and stored[b"accepted"] == b"2"
    assert len(await redis.lrange(errors, 0, -1)) == 2
    # counted again once logged: the entry keeps its TTL, a new error list takes it too
    await redis.delete(errors)
    await worker_counts(redis, "r1", written=1, errors=1)
    assert (await redis.hgetall(entry))[b"written"] == b"2"
    for key in (entry, errors):
        assert await redis.pttl(key) > 0.99 * DAY_MS


async def test_a_worker_counting_a_trimmed_request_leaves_nothing(redis):
    accountant = Accountant(redis, log_max_entries=1)
    now = int(time.time() * 1000)
    accountant.record(outcome("first", now))
    accountant.record(outcome("second", now + 1))
    await accountant.flush()
    assert await log_ids(redis) == ["second"]
    await worker_counts(redis, "first", written=2, errors=1, received_at_ms=now)  # lagging
    assert await keys_of(redis, "first") == set()
    # a request received after the oldest entry but not logged yet is counted (briefly)
    await worker_counts(redis, "third", written=2, errors=1, received_at_ms=now + 2)
    assert await keys_of(redis, "third") == {"entry", "errors"}
    assert 0 < await redis.pttl(o.request_key(CONNECTOR, "third")) <= o.ORPHAN_TTL_MS


async def test_request_ids_that_extend_one_another_keep_their_keys_apart(redis):
    """Request ids come from clients (X-Request-ID) and from Kafka headers: the entry of
    request `R:errors` must not be the error list of request `R` (Redis would refuse every
    command on it with WRONGTYPE: the log's pages, the workers' counts, the gateway's
    flushes)."""
    accountant = Accountant(redis)
    accountant.record(outcome("ext:errors"))
    accountant.record(outcome("ext"))
    await accountant.flush()
    await worker_counts(redis, "ext", written=1, errors=1)
    await worker_counts(redis, "ext:errors", written=2, errors=2)
    for request_id, written in (("ext", 1), ("ext:errors", 2)):
        assert await keys_of(redis, request_id) == {"entry", "errors"}
        assert (await redis.hgetall(o.request_key(CONNECTOR, request_id)))[b"written"] == (
            str(written).encode())
        assert len(await redis.lrange(o.request_errors_key(CONNECTOR, request_id), 0, -1)) == (
            written)
