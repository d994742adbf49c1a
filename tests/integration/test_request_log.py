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
from schemas.keys import hash_key, new_key
from tests.integration.conftest import with_sales_key
from tests.integration.test_push import assert_problem
from tests.integration.test_workers import wait_for
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


JOURNAL = {"id": "journal", "schema": {"type": "object", "properties": {
    "account": {"type": "string"}}, "required": ["account"]}}


async def test_a_connectors_log_shows_other_keys_only_the_datasets_they_may_write(make_gateway):
    """Connector "pos" sends to sales and journal. "till" (sales only) may read pos's log,
    but sees only its sales entries (it saw journal's too, errors quoting the values
    included); total, from and size count what it sees, so pages are full and skip nothing.
    pos itself and admin keys see everything."""
    admin = new_key("ops")
    gw = await make_gateway(datasets=(JOURNAL,), SLUICE_ADMIN_KEYS=f"ops:{hash_key(admin)}")
    sent: dict[str, list[str]] = {"sales": [], "journal": []}
    for i in range(7):
        rid = f"s{i}"
        resp = await gw.post(orjson.dumps({"region": f"r{i}", "revenue": i}),
                             **{"X-Request-ID": rid})
        assert resp.status == 202
        sent["sales"].append(rid)
        for j in range(2):
            rid = f"j{i}-{j}"
            resp = await gw.post(orjson.dumps({"account": 4111_1111_1111_1111 + i}),
                                 dataset="journal", **{"X-Request-ID": rid})
            assert resp.status == 400  # its error quotes the number
            sent["journal"].append(rid)

    async def log(client, key: str, query: str = "") -> dict:
        resp = await client.get(f"/v1/connectors/pos/logs{query}",
                                headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def everything_logged() -> bool:
        return (await log(gw.client, admin, "?size=1"))["total"] == 21

    await wait_for(everything_logged)
    till_client, till = await with_sales_key(gw, "till")
    try:
        seen = await log(till_client, till, "?size=100")
        assert seen["total"] == 7 and len(seen["entries"]) == 7
        assert {e["dataset"] for e in seen["entries"]} == {"sales"}
        assert sorted(e["request_id"] for e in seen["entries"]) == sent["sales"]
        assert b"4111" not in orjson.dumps(seen)
        newest_first = [e["request_id"] for e in seen["entries"]]
        assert [e["timestamp"] for e in seen["entries"]] == sorted(
            (e["timestamp"] for e in seen["entries"]), reverse=True)
        pages = [await log(till_client, till, f"?from={start}&size=3") for start in (0, 3, 6)]
        assert [len(p["entries"]) for p in pages] == [3, 3, 1]
        assert [e["request_id"] for p in pages for e in p["entries"]] == newest_first
        assert {p["total"] for p in pages} == {7}
        beyond = await log(till_client, till, "?from=7")
        assert beyond["entries"] == [] and beyond["total"] == 7
        # the connector's own key and an admin key see both datasets
        for client, key in ((gw.client, gw.key), (till_client, admin)):
            full = await log(client, key, "?size=100")
            assert full["total"] == 21
            assert sorted(e["request_id"] for e in full["entries"]) == sorted(
                sent["sales"] + sent["journal"])
            assert b"4111111111111111" in orjson.dumps(full)  # what till must not see
        # a key of none of pos's datasets may not read it at all
        resp = await gw.client.get("/v1/connectors/pos/logs",
                                   headers={"Authorization": f"Bearer {gw.other_key}"})
        await assert_problem(resp, 403, "FORBIDDEN")
        # till's own log holds nothing
        resp = await till_client.get("/v1/connectors/till/logs",
                                     headers={"Authorization": f"Bearer {till}"})
        assert resp.status == 200 and (await resp.json())["total"] == 0
    finally:
        await till_client.close()


async def test_paging_after_a_cursor_neither_repeats_nor_skips_while_entries_arrive(
        make_gateway):
    """Offsets shift as new entries arrive (newest first): page two repeated page one's
    last entry. ``after`` (the ``next`` of the page before) starts after that entry, for
    the connector's own key (every entry) and another key (its datasets' entries)."""
    admin = new_key("ops")
    gw = await make_gateway(datasets=(JOURNAL,), SLUICE_ADMIN_KEYS=f"ops:{hash_key(admin)}")

    async def push(rid: str, dataset: str = "sales") -> None:
        body = {"region": rid, "revenue": 1} if dataset == "sales" else {"account": 1}
        resp = await gw.post(orjson.dumps(body), dataset=dataset, **{"X-Request-ID": rid})
        assert resp.status in (202, 400)

    async def log(client, key: str, query: str) -> dict:
        resp = await client.get(f"/v1/connectors/pos/logs{query}",
                                headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    for i in range(5):
        await push(f"old{i}")
        await push(f"jold{i}", "journal")

    async def logged(n: int) -> bool:
        return (await log(gw.client, admin, "?size=1"))["total"] == n

    await wait_for(lambda: logged(10))
    till_client, till = await with_sales_key(gw, "till")
    try:
        for client, key, datasets in ((gw.client, gw.key, {"sales", "journal"}),
                                      (till_client, till, {"sales"})):
            whole = (await log(client, key, "?size=100"))["entries"]
            assert {e["dataset"] for e in whole} == datasets
            expected = [e["request_id"] for e in whole]
            first = await log(client, key, "?size=3")
            await push(f"new-{key[-6:]}")  # arrives between the two pages
            await wait_for(lambda n=11 + (key == till): logged(n))
            seen = [e["request_id"] for e in first["entries"]]
            page = first
            while page["next"] is not None:
                page = await log(client, key, f"?size=3&after={page['next']}")
                seen += [e["request_id"] for e in page["entries"]]
            assert seen == expected
            assert page["from"] + len(page["entries"]) == page["total"]
        for query in ("?after=nobody", "?after=old1&from=2", "?after="):
            resp = await till_client.get(f"/v1/connectors/pos/logs{query}",
                                         headers={"Authorization": f"Bearer {till}"})
            await assert_problem(resp, 400, "INVALID_PARAMETER")
        # an entry the key may not see is no cursor for it either
        resp = await till_client.get("/v1/connectors/pos/logs?after=jold1",
                                     headers={"Authorization": f"Bearer {till}"})
        await assert_problem(resp, 400, "INVALID_PARAMETER")
    finally:
        await till_client.close()
