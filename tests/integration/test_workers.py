"""Workers end to end on real services: HTTP or Kafka in, typed rows, DLQ, logs and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import jsontext, metrics
from schemas import records as r
from schemas.dataset import Limits, parse_dataset
from schemas.structure import Structure
from tests.integration.test_push import ITEMS
from tests.services import consume_all, create_topics, produce, produce_batch
from workers import unreadable
from workers.config import WorkerSettings
from workers.consumer import Worker
from workers.sinks import open_sink
from workers.sinks.sqlite import path_of

pytestmark = pytest.mark.integration


async def wait_for(check, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s; last result {result!r}")
        await asyncio.sleep(interval)


class Running:
    """A worker running as a task of this test's event loop."""

    def __init__(self, gw, storage_url: str, group: str | None = None, **env: str):
        self.settings = WorkerSettings.from_env({
            "STORAGE_URL": storage_url,
            "SLUICE_CATALOGUE_DIR": str(gw.settings.catalogue_dir),
            "KAFKA_BOOTSTRAP_SERVERS": gw.bootstrap,
            "KAFKA_ENABLE_IDEMPOTENCE": "false",
            "REDIS_URL": gw.redis_url,
            "WORKER_GROUP_ID": group or f"test-{uuid.uuid4().hex[:8]}",
            "WORKER_BATCH_MS": "50",
            "WORKER_SESSION_TIMEOUT_MS": "3000",  # Tansu holds a new group for half of it
            **env,
        })
        self.worker = Worker(self.settings)
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.worker.run())
        return self

    async def __aexit__(self, *exc):
        self.worker.stop()
        await asyncio.wait_for(self.task, 15)


async def _stopped(worker: Worker) -> None:
    """Stop what ``worker._start`` started, for a test that polls and handles by hand."""
    if worker.consumer is not None:
        await worker.consumer.stop()
    await worker.dlq.stop()
    await worker.sink.close()
    await worker.redis.aclose()


async def rows(storage_url: str, sql: str) -> list[tuple]:
    if storage_url.startswith("sqlite"):
        path = path_of(storage_url)
        if not path.exists():
            return []
        conn = sqlite3.connect(path)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []  # table not created yet
        finally:
            conn.close()
    conn = await asyncpg.connect(storage_url)
    try:
        return [tuple(x) for x in await conn.fetch(sql)]
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


async def count(storage_url: str, table: str = "sales") -> int:
    got = await rows(storage_url, f"SELECT count(*) FROM {table}")
    return got[0][0] if got else 0


async def stats(gw, key: str | None = None) -> dict:
    resp = await gw.client.get("/v1/datasets/sales/stats",
                               headers={"Authorization": f"Bearer {key or gw.key}"})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_http_push_becomes_typed_rows(gateway, storage_url):
    items = [{"region": "North", "revenue": 142000.5, "target": 130000},
             {"region": "South", "revenue": 98000}]
    resp = await gateway.post(orjson.dumps(items), **{"X-Request-ID": "req-typed"})
    assert resp.status == 202
    async with Running(gateway, storage_url):
        await wait_for(lambda: _equals(count(storage_url), 2))
    got = await rows(storage_url, "SELECT region, revenue, target, _request_id, _connector, "
                     "_received_at, _topic FROM sales ORDER BY region")
    assert [g[:5] for g in got] == [("North", 142000.5, 130000.0, "req-typed", "pos"),
                                    ("South", 98000.0, None, "req-typed", "pos")]
    received = got[0][5]
    if storage_url.startswith("sqlite"):
        assert received.endswith("Z") and received.startswith(str(datetime.now(UTC).year))
    else:
        assert isinstance(received, datetime) and received.tzinfo is not None
    assert got[0][6] == gateway.topic


async def _equals(awaitable, expected):
    return (await awaitable) == expected


class Killed(Exception):
    """Stands for the process dying at this point."""


async def test_crash_after_write_before_commit_stores_nothing_twice(gateway, tmp_path):
    storage = f"sqlite:///{tmp_path}/crash.db"
    for i in range(3):
        body = orjson.dumps([{"region": f"r{i}-{j}", "revenue": j} for j in range(10)])
        assert (await gateway.post(body)).status == 202
    group = f"crash-{uuid.uuid4().hex[:6]}"
    crashing = Running(gateway, storage, group)

    async def crash(batch):
        raise Killed("after writing, before committing")

    crashing.worker._commit = crash
    crashing.task = asyncio.create_task(crashing.worker.run())
    with pytest.raises(Killed):
        await asyncio.wait_for(crashing.task, 20)
    assert await count(storage) == 30  # written, never committed
    async with Running(gateway, storage, group) as again:
        await wait_for(lambda: _positive(again.worker.batches))
    assert await count(storage) == 30  # the redelivered batch stored nothing twice
    totals = (await stats(gateway))["totals"]
    assert totals["written"] == 30 and totals["duplicates"] == 30


async def _positive(value):
    return value > 0


async def test_a_batch_stored_while_redis_is_away_is_counted_once(make_gateway, own_redis,
                                                                   tmp_path):
    """Redis stops answering between a batch's write and its statistics: the statistics are
    retried, not the write (which would find the rows stored and count them as duplicates).
    The batch loop is the same for both stores: SQLite only."""
    storage_url = f"sqlite:///{tmp_path}/away.db"
    redis = own_redis()
    gateway = await make_gateway(redis=redis.url)
    for i in range(3):
        body = orjson.dumps([{"region": f"away-{i}-{j}", "revenue": j} for j in range(10)])
        assert (await gateway.post(body)).status == 202
    from prometheus_client import REGISTRY

    async def retried() -> float:
        return sum(REGISTRY.get_sample_value("sluice_worker_batch_retries_total",
                                             {"reason": reason}) or 0
                   for reason in ("TimeoutError", "ConnectionError"))

    before = await retried()
    await asyncio.sleep(0.3)  # the gateway's counts are flushed
    redis.pause()
    try:
        async with Running(gateway, storage_url) as running:
            await wait_for(lambda: _equals(count(storage_url), 30))
            # the statistics timed out (after the client's own retry) and wait to be retried
            await wait_for(lambda: _equals(retried(), before + 1), timeout=30)
            assert running.worker.batches == 0  # not committed without its statistics
            redis.resume()
            await wait_for(lambda: _positive(running.worker.batches))
    finally:
        redis.resume()
    totals = (await stats(gateway))["totals"]
    assert (totals["written"], totals["duplicates"]) == (30, 0)
    assert await count(storage_url) == 30


async def test_a_worker_told_to_stop_while_redis_is_away_stops_and_commits_nothing(
        make_gateway, own_redis, tmp_path):
    """A SIGTERM during an outage (a rolling deploy, say) ends the worker within its Redis
    timeouts instead of waiting for Redis; its batch is delivered again and stored once."""
    storage = f"sqlite:///{tmp_path}/stop.db"
    redis = own_redis()
    gateway = await make_gateway(redis=redis.url)
    body = orjson.dumps([{"region": f"stop-{j}", "revenue": j} for j in range(10)])
    assert (await gateway.post(body)).status == 202
    group = f"stop-{uuid.uuid4().hex[:6]}"
    redis.pause()
    try:
        stopping = Running(gateway, storage, group)
        async with stopping:
            await wait_for(lambda: _equals(count(storage), 10))  # stored; statistics stuck
            stopping.worker.stop()
            await asyncio.wait_for(asyncio.shield(stopping.task), 10)
        assert stopping.worker.batches == 0
    finally:
        redis.resume()
    async with Running(gateway, storage, group) as again:
        await wait_for(lambda: _positive(again.worker.batches))
    assert await count(storage) == 10


async def _over_two_partitions(gateway, events: int) -> None:
    """``events`` objects into dataset "other" (append-only, any object), alternately into
    partitions 0 and 1."""
    producer = AIOKafkaProducer(bootstrap_servers=gateway.bootstrap, acks="all",
                                enable_idempotence=False)
    await producer.start()
    try:
        for n in range(events):
            await producer.send(gateway.other_topic, orjson.dumps({"n": n}), partition=n % 2)
        await producer.flush()
    finally:
        await producer.stop()


async def test_a_rebalance_inside_a_poll_puts_no_record_in_the_batch_twice(gateway, tmp_path):
    """A poll is several fetches. aiokafka starts a new assignment at every rebalance, and a
    partition the worker keeps is fetched again from its committed offset: a rebalance
    between two fetches put those records in the batch twice, and an append-only table
    (offset fences compare with the stored fence only) stored each twice."""
    storage = f"sqlite:///{tmp_path}/rebalance.db"
    await _over_two_partitions(gateway, 200)
    group = f"rebalance-{uuid.uuid4().hex[:6]}"
    worker = Running(gateway, storage, group, WORKER_BATCH_MS="8000").worker
    joining = AIOKafkaConsumer(gateway.other_topic, bootstrap_servers=gateway.bootstrap,
                               group_id=group, enable_auto_commit=False,
                               session_timeout_ms=3000, heartbeat_interval_ms=1000)
    try:
        await worker._start()
        polling = asyncio.create_task(worker._poll())
        await asyncio.sleep(1)  # the worker has fetched both partitions of the topic
        await joining.start()  # and this one joins the group: a rebalance inside the poll
        batch = await polling
        kept = {tp.partition for tp in worker.consumer.assignment()
                if tp.topic == gateway.other_topic}
        assert len(kept) == 1  # the rebalance did happen inside the poll
        records = [(rec.topic, rec.partition, rec.offset) for rec in batch]
        assert len(records) == len(set(records))
        assert {p for t, p, _ in records if t == gateway.other_topic} == {0, 1}
        await worker._handle(batch)
        assert await count(storage, "other") == len(records)
    finally:
        await joining.stop()
        await _stopped(worker)


async def test_the_lag_of_a_partition_a_rebalance_took_reads_zero_here(gateway, tmp_path):
    """The lag gauge of a partition a rebalance moved to another worker kept its last value
    for good: summed with the new owner's, it fired the lag alerts while nothing lagged."""
    storage = f"sqlite:///{tmp_path}/lag.db"
    await _over_two_partitions(gateway, 20)
    group = f"lag-{uuid.uuid4().hex[:6]}"
    topic = gateway.other_topic
    joining = AIOKafkaConsumer(topic, bootstrap_servers=gateway.bootstrap, group_id=group,
                               enable_auto_commit=False, session_timeout_ms=3000,
                               heartbeat_interval_ms=1000)
    async with Running(gateway, storage, group) as running:
        await wait_for(lambda: _equals(count(storage, "other"), 20), timeout=30)
        lag = {p: metrics.CONSUMER_LAG.labels(topic, str(p)) for p in (0, 1)}
        for gauge in lag.values():
            gauge.set(7)  # as shown while it lagged
        await joining.start()  # a rebalance: one partition moves to the new member
        try:
            async def one_moved() -> bool:
                kept = {tp.partition for tp in running.worker.consumer.assignment()
                        if tp.topic == topic}
                return len(kept) == 1 and lag[1 - kept.pop()]._value.get() == 0

            await wait_for(one_moved, timeout=30)
            kept = next(tp.partition for tp in running.worker.consumer.assignment()
                        if tp.topic == topic)
            assert lag[kept]._value.get() == 7  # its own partition: as it was
        finally:
            await joining.stop()


async def test_an_idempotency_key_reused_after_the_gateway_forgot_it_is_stored(
        make_gateway, storage_url):
    """Stripe's semantics: once the gateway has forgotten a key (SLUICE_IDEMPOTENCY_TTL_S
    after its request), a client may send it with another body, which the gateway takes
    (202) and publishes. The workers, given the same window, store it: an append-only table
    used to skip it as a copy, for ever, and count it as a duplicate."""
    gateway = await make_gateway(SLUICE_IDEMPOTENCY_TTL_S="1")
    headers = {"Idempotency-Key": "monthly-report", "X-Request-ID": "first"}
    first = await gateway.post(b'{"n": 1}', key=gateway.other_key, dataset="other", **headers)
    assert first.status == 202
    async with Running(gateway, storage_url, SLUICE_IDEMPOTENCY_TTL_S="1"):
        await wait_for(lambda: _equals(count(storage_url, "other"), 1))
        headers["X-Request-ID"] = "second"

        async def taken() -> bool:  # 422 IDEMPOTENCY_KEY_REUSED until the key is forgotten
            resp = await gateway.post(b'{"n": 2}', key=gateway.other_key, dataset="other",
                                      **headers)
            assert resp.status in (202, 422), await resp.text()
            return resp.status == 202

        await wait_for(taken, timeout=10)
        await wait_for(lambda: _equals(count(storage_url, "other"), 2))
    got = await rows(storage_url, "SELECT _request_id, _extra FROM other ORDER BY _request_id")
    assert [(rid, orjson.loads(extra)) if isinstance(extra, str) else (rid, extra)
            for rid, extra in got] == [("first", {"n": 1}), ("second", {"n": 2})]


async def test_out_of_order_item_key_updates_keep_the_newest(gateway, storage_url):
    newer = [(r.H_RECEIVED_AT, b"1800000002000"), (r.H_CONNECTOR, b"pos")]
    older = [(r.H_RECEIVED_AT, b"1800000001000"), (r.H_CONNECTOR, b"pos")]
    await produce(gateway.bootstrap, gateway.topic,
                  orjson.dumps([{"region": "North", "revenue": 2}]), newer)
    await produce(gateway.bootstrap, gateway.topic,
                  orjson.dumps([{"region": "North", "revenue": 1}]), older)
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _positive(running.worker.batches))
        await wait_for(lambda: _equals(count(storage_url), 1))
        await asyncio.sleep(0.3)
    assert await rows(storage_url, "SELECT region, revenue FROM sales") == [("North", 2.0)]


async def test_unconvertible_record_goes_to_the_dlq_and_the_partition_flows(gateway, tmp_path):
    storage = f"sqlite:///{tmp_path}/dlq.db"
    bad = orjson.dumps([{"region": "East", "revenue": "lots"}, {"region": "West", "revenue": 7}])
    await produce(gateway.bootstrap, gateway.topic, bad, [(r.H_REQUEST_ID, b"req-bad")])
    await produce(gateway.bootstrap, gateway.topic, b"{not json")
    assert (await gateway.post(orjson.dumps(ITEMS))).status == 202
    async with Running(gateway, storage):
        await wait_for(lambda: _equals(count(storage), 3))
    assert sorted(x[0] for x in await rows(storage, "SELECT region FROM sales")) == [
        "North", "South", "West"]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(gateway.topic))
    assert len(dead) == 2
    by_code = {dict(d.headers)[r.H_ERROR_CODE]: d for d in dead}
    shaped = by_code[b"SHAPE_FAILED"]
    assert orjson.loads(shaped.value) == {"region": "East", "revenue": "lots"}
    headers = dict(shaped.headers)
    assert b"revenue" in headers[r.H_ERROR]
    assert headers[r.H_SOURCE_TOPIC] == gateway.topic.encode()
    assert headers[r.H_SOURCE_INDEX] == b"0"
    assert headers[r.H_REQUEST_ID] == b"req-bad"
    assert by_code[b"MALFORMED_JSON"].value == b"{not json"
    totals = (await stats(gateway))["totals"]
    assert totals["failed"] == 2 and totals["written"] == 3


async def test_a_record_too_large_to_dead_letter_goes_without_its_value(gateway, tmp_path):
    """A record just under the size limit that cannot be stored: with the error headers its
    dead letter is over the limit, and retried as it is it would hold up the partition for
    ever. It goes without its value, which stays at the source coordinates."""
    storage = f"sqlite:///{tmp_path}/big.db"
    big = b"{" + b"x" * 1_048_200  # not JSON; the broker takes it, with our headers not
    await produce(gateway.bootstrap, gateway.topic, big,
                  [(r.H_REQUEST_ID, b"req-big-" + b"y" * 200)])
    assert (await gateway.post(orjson.dumps(ITEMS))).status == 202
    async with Running(gateway, storage) as running:
        await wait_for(lambda: _equals(count(storage), 2))
        await wait_for(lambda: _positive(running.worker.batches))  # the partition flows
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(gateway.topic))
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert dead[0].value == b""
    assert headers[r.H_VALUE_OMITTED] == str(len(big)).encode()
    assert headers[r.H_ERROR_CODE] == b"MALFORMED_JSON"
    source = await consume_all(gateway.bootstrap, gateway.topic)
    offset = int(headers[r.H_SOURCE_OFFSET])
    assert [x.value for x in source
            if x.offset == offset and x.partition == int(headers[r.H_SOURCE_PARTITION])] == [big]


async def test_values_beyond_the_stores_range_are_dead_lettered_and_the_partition_flows(
        gateway, storage_url):
    """JSON Schema's "integer" has no bound and orjson reads up to 2**64 - 1; the stores keep
    64 bits. Such an event used to fail its batch's write, which was no transient error:
    the worker stopped, and its replacement met the same batch. An epoch beyond the
    platform's time (a Kafka-native producer's; the gateway wants date-time text) stopped
    the worker in the same way. RFC 3339's lowercase and leap-second forms are stored."""
    topic = await _dataset(gateway, "wide", "schema: {type: object, properties: "
                           "{n: {type: integer}, at: {type: string, format: date-time}}}\n")
    await produce(gateway.bootstrap, topic, b'[{"n": 9223372036854775808}, {"n": 5}, '
                  b'{"n": 6, "at": 100000000000000000000}, {"n": 7, "at": "1990-12-31t23:59:60z"}]')
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "wide"), 2), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT n FROM wide ORDER BY n") == [(5,), (7,)]
    assert await rows(storage_url, "SELECT n FROM wide WHERE at IS NOT NULL") == [(7,)]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert [(dict(d.headers)[r.H_ERROR_CODE], d.value) for d in dead] == [
        (b"SHAPE_FAILED", b'{"n":9223372036854775808}'),
        (b"SHAPE_FAILED", b'{"n":6,"at":1e+20}')]  # as orjson reads it
    running.task.result()


async def test_an_item_without_its_key_is_dead_lettered_and_the_partition_flows(
        gateway, storage_url):
    """A null item key is no key: PostgreSQL refused the batch (NOT NULL of the primary key),
    for ever, and SQLite kept a row per null. The gateway refuses one; a Kafka-native record
    can still hold one. A required field whose schema allows null is stored as NULL."""
    topic = await _dataset(gateway, "keyed", "item_key: k\nschema: {type: object, properties: "
                           "{k: {type: [string, 'null']}, note: {type: [string, 'null']}}, "
                           "required: [note]}\n")
    await produce(gateway.bootstrap, topic,
                  b'[{"k": null, "note": "x"}, {"note": "y"}, {"k": "a", "note": null}]')
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "keyed"), 1), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT k, note FROM keyed") == [("a", None)]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert [(dict(d.headers)[r.H_ERROR], d.value) for d in dead] == [
        (b"$.k: is required", b'{"k":null,"note":"x"}'), (b"$.k: is required", b'{"note":"y"}')]
    running.task.result()


async def test_an_item_key_of_any_json_is_a_scalar_and_the_partition_flows(gateway,
                                                                           storage_url):
    """An item key whose field may hold any JSON (untyped here, or of several types) that
    held an object or array stopped the worker (a batch keeps one row per key, in a dict:
    unhashable), and its replacement, for ever. It is dead-lettered; an integral number is
    the integer (1.0 is 1, as PostgreSQL's jsonb compares them); 1, true and "1" are three
    items (SQLite took them for one, and a batch for two: 1 == True in Python)."""
    topic = await _dataset(gateway, "anykey", "item_key: k\nschema: {type: object, properties: "
                           "{k: {}, n: {type: integer}}}\n")
    await produce(gateway.bootstrap, topic, b'[{"k": [1], "n": 1}, {"k": {"a": 1}, "n": 2}, '
                  b'{"k": 1, "n": 3}, {"k": 1.0, "n": 4}, {"k": "a", "n": 5}, '
                  b'{"k": true, "n": 6}, {"k": "1", "n": 7}]')
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "anykey"), 4), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    # the key as JSON text in either store (jsonb read without a codec is its text)
    assert sorted(await rows(storage_url, "SELECT k, n FROM anykey"), key=lambda x: x[1]) == [
        ("1", 4), ('"a"', 5), ("true", 6), ('"1"', 7)]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert sorted((d.value, dict(d.headers)[r.H_ERROR]) for d in dead) == [
        (b'{"k":[1],"n":1}', b"$.k: an item key must be a string, a number or a boolean, "
                             b"not an array"),
        (b'{"k":{"a":1},"n":2}', b"$.k: an item key must be a string, a number or a boolean, "
                                 b"not an object")]
    running.task.result()


_LOOSE = {"id": "loose", "schema": {"type": "object", "properties": {
    "id": {"type": "integer"}, "v": {}, "w": {"type": ["string", "integer"]}}}}


async def test_json_values_keep_their_json_type_in_either_store(make_gateway, storage_url):
    """A field that may hold any JSON (untyped, of several types, an array: a json column).
    SQLite bound its plain values as they were: an integer from 2**63 to 2**64 - 1 (the
    gateway accepts it, orjson reads it as an int) stopped every worker with OverflowError,
    and true, 1 and "1" were all stored as '1' (the text "true" read back as a boolean).
    Each value is now kept as its JSON text, as PostgreSQL's jsonb keeps it."""
    gateway = await make_gateway(datasets=(_LOOSE,))
    values = [2**64 - 1, True, 1, "1", "true", 1.5, {"a": [1, None]}, [], -(2**63)]
    plain = (str, int)  # what w takes
    items = [{"id": i, "v": v, "other": v, **({"w": v} if type(v) in plain else {})}
             for i, v in enumerate(values)]
    resp = await gateway.post(orjson.dumps(items), dataset="loose")
    assert resp.status == 202, await resp.text()
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "loose"), len(values)), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    got = await rows(storage_url, "SELECT v, w, _extra FROM loose ORDER BY id")
    typed = [[(type(x), x) for x in (orjson.loads(v), None if w is None else orjson.loads(w),
                                     orjson.loads(extra)["other"])] for v, w, extra in got]
    assert typed == [[(type(v), v), (type(v), v) if type(v) in plain else (type(None), None),
                      (type(v), v)] for v in values]
    running.task.result()


async def test_json_nested_deeper_than_orjson_writes_is_stored_in_either_store(
        make_gateway, storage_url):
    """orjson reads up to 1024 levels and writes at most 254: a json column (here a field
    the gateway takes as any JSON, and an unknown field kept in _extra) holding a deeper
    value stopped every worker, in SQLite's binding and PostgreSQL's COPY alike. It is
    stored, as deep as it came."""
    gateway = await make_gateway(datasets=(_LOOSE,))
    body = (b'[{"id": 1, "v": ' + nested(1000) + b'}, {"id": 2, "v": 1}, '
            b'{"id": 3, "extra": ' + nested(300) + b"}]")  # 1,002 levels: orjson reads 1,024
    resp = await gateway.post(body, dataset="loose")
    assert resp.status == 202, await resp.text()
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "loose"), 3), timeout=30)
    got = await rows(storage_url, "SELECT id, v, _extra FROM loose ORDER BY id")
    # as JSON text again, the same in either store (Python compares 1,000 levels no deeper)
    assert [(i, v and jsontext.dumps(orjson.loads(v)), extra and jsontext.dumps(
        orjson.loads(extra))) for i, v, extra in got] == [
        (1, nested(1000), None), (2, b"1", None), (3, None, b'{"extra":' + nested(300) + b"}")]
    topic = gateway.topic.replace("ingest.sales.", "ingest.loose.")
    assert await consume_all(gateway.bootstrap, r.dlq_topic(topic)) == []
    running.task.result()


async def test_an_item_whose_newest_write_the_store_refuses_keeps_the_one_before(
        gateway, storage_url):
    """In an item-key dataset the newest write of an item in a batch supersedes the older
    ones; refused, it no longer does, and the older write is stored."""
    topic = f"ingest.guarded.{uuid.uuid4().hex[:8]}"
    await create_topics(gateway.bootstrap, [topic, r.dlq_topic(topic)], partitions=1)
    await _guarded(gateway, storage_url, topic, "item_key: k\n")
    for value in (b'{"k": "a", "n": 1}', b'{"k": "a", "n": 500}', b'{"k": "b", "n": 2}'):
        await produce(gateway.bootstrap, topic, value)
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "guarded"), 2), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT k, n FROM guarded ORDER BY k") == [("a", 1),
                                                                                ("b", 2)]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert [(dict(d.headers)[r.H_ERROR_CODE], d.value) for d in dead] == [
        (b"STORE_REFUSED", b'{"k":"a","n":500}')]
    running.task.result()


async def _dataset(gateway, dataset_id: str, definition: str, partitions: int = 1) -> str:
    """Dataset ``dataset_id`` (``definition``: the rest of its YAML) in the gateway's catalogue,
    on an entry topic of its own, made with its dead-letter topic (one partition unless
    ``partitions``): the topic."""
    topic = f"ingest.{dataset_id}.{uuid.uuid4().hex[:8]}"
    await create_topics(gateway.bootstrap, [topic, r.dlq_topic(topic)], partitions=partitions)
    (gateway.settings.catalogue_dir / f"{dataset_id}.yaml").write_text(
        f"id: {dataset_id}\nentry_topic: {topic}\n{definition}")
    return topic


async def _guarded(gateway, storage_url: str, topic: str, extra: str = "") -> None:
    """Dataset ``guarded`` (n, and k), its table made, and a constraint added to it as an
    operator would: n below 100."""
    definition = (f"id: guarded\nentry_topic: {topic}\n{extra}"
                  "schema: {type: object, properties: {n: {type: integer}, k: {type: string}}}\n")
    (gateway.settings.catalogue_dir / "guarded.yaml").write_text(definition)
    sink = open_sink(storage_url, WorkerSettings.from_env({}).idempotency_ttl_s)
    await sink.start()
    await sink.prepare(Structure(parse_dataset(yaml.safe_load(definition), Limits())))
    await sink.close()
    await execute(storage_url, *(
        ["CREATE TRIGGER small BEFORE INSERT ON guarded WHEN NEW.n >= 100 "
         "BEGIN SELECT RAISE(ABORT, 'n must be below 100'); END",
         "CREATE TRIGGER small_update BEFORE UPDATE ON guarded WHEN NEW.n >= 100 "
         "BEGIN SELECT RAISE(ABORT, 'n must be below 100'); END"]
        if storage_url.startswith("sqlite") else
        ["ALTER TABLE guarded ADD CONSTRAINT small CHECK (n < 100)"]))


async def test_rows_the_store_refuses_are_dead_lettered_and_the_partition_flows(
        gateway, storage_url):
    """A constraint an operator added to the table (here n < 100), or any row the store will
    not keep: the batch's write failed the same way at every retry and the worker stopped,
    its replacement too. Now the rows refused alone go to the dead-letter topic, the rest of
    the batch (the refused event's own record included) is stored, exactly once."""
    topic = f"ingest.guarded.{uuid.uuid4().hex[:8]}"
    await create_topics(gateway.bootstrap, [topic, r.dlq_topic(topic)], partitions=1)
    await _guarded(gateway, storage_url, topic)
    await produce(gateway.bootstrap, topic, b'[{"n": 1}, {"n": 500}, {"n": 2}]')
    await produce(gateway.bootstrap, topic, b'[{"n": 3}, {"n": 700}]')
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "guarded"), 3), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT n FROM guarded ORDER BY n") == [(1,), (2,), (3,)]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert [(dict(d.headers)[r.H_ERROR_CODE], d.value, dict(d.headers)[r.H_SOURCE_INDEX])
            for d in dead] == [(b"STORE_REFUSED", b'{"n":500}', b"1"),
                               (b"STORE_REFUSED", b'{"n":700}', b"1")]
    assert all(b"small" in dict(d.headers)[r.H_ERROR] or b"below 100" in dict(d.headers)[
        r.H_ERROR] for d in dead)
    running.task.result()


async def execute(storage_url: str, *statements: str) -> None:
    if storage_url.startswith("sqlite"):
        with sqlite3.connect(path_of(storage_url)) as conn:
            for sql in statements:
                conn.execute(sql)
        return
    conn = await asyncpg.connect(storage_url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def test_the_nul_character_is_dead_lettered_and_the_partition_flows(gateway,
                                                                          storage_url):
    """PostgreSQL keeps no NUL in text or jsonb: a row with one failed its batch's write for
    ever. An event with one is dead-lettered (on either store, alike); in a header, which is
    metadata, it becomes U+FFFD."""
    body = b'[{"region": "a\\u0000b", "revenue": 1}, {"region": "ok", "revenue": 2}, ' \
           b'{"region": "deep", "revenue": 3, "tags": {"k\\u0000": 1}}]'
    await produce(gateway.bootstrap, gateway.topic, body, [(r.H_REQUEST_ID, b"req\x00nul")])
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url), 1), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT region, _request_id FROM sales") == [
        ("ok", "req\ufffdnul")]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(gateway.topic))
    assert sorted((dict(d.headers)[r.H_ERROR].decode(), d.value) for d in dead) == [
        ("$.region: contains the NUL character (\\u0000), which the stores cannot keep",
         b'{"region":"a\\u0000b","revenue":1}'),
        ("$.tags: contains the NUL character (\\u0000), which the stores cannot keep",
         b'{"region":"deep","revenue":3,"tags":{"k\\u0000":1}}')]
    running.task.result()


def nested(levels: int, inner: bytes = b"1") -> bytes:
    """JSON text of ``inner`` inside ``levels`` arrays."""
    return b"[" * levels + inner + b"]" * levels


async def test_an_event_nested_deeper_than_orjson_writes_is_dead_lettered_as_it_came(
        gateway, storage_url):
    """orjson reads JSON nested up to 1024 levels and writes at most 254. Writing the dead
    letter of such an event (here an array where a text goes, and a NUL 1000 levels down,
    whose search also outran Python's recursion limit) stopped the worker, and its
    replacement, for ever. The letter holds the event, as deep as it came."""
    body = (b'[{"region": ' + nested(300) + b', "revenue": 1}, {"region": "ok", "revenue": 2}, '
            b'{"region": "nul", "revenue": 3, "tags": ' + nested(1000, b'"\\u0000"') + b'}]')
    await produce(gateway.bootstrap, gateway.topic, body)
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url), 1), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT region FROM sales") == [("ok",)]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(gateway.topic))
    assert sorted((d.value, dict(d.headers)[r.H_SOURCE_INDEX],
                   dict(d.headers)[r.H_ERROR].decode()) for d in dead) == [
        (b'{"region":"nul","revenue":3,"tags":' + nested(1000, b'"\\u0000"') + b"}", b"2",
         f"$.tags{'[0]' * 1000}: contains the NUL character (\\u0000), which the "
         "stores cannot keep"),
        (b'{"region":' + nested(300) + b',"revenue":1}', b"0",
         "$.region: expected a string, got list")]
    running.task.result()


async def test_a_refused_event_nested_deeper_than_orjson_writes_is_dead_lettered_as_it_came(
        gateway, storage_url):
    """The same for an event the store refuses (a field the dataset drops holds the depth)."""
    topic = f"ingest.guarded.{uuid.uuid4().hex[:8]}"
    await create_topics(gateway.bootstrap, [topic, r.dlq_topic(topic)], partitions=1)
    await _guarded(gateway, storage_url, topic, "unknown_fields: drop\n")
    body = b'[{"n": 1}, {"n": 500, "deep": ' + nested(300) + b'}]'
    await produce(gateway.bootstrap, topic, body)
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url, "guarded"), 1), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert [(d.value, dict(d.headers)[r.H_ERROR_CODE], dict(d.headers)[r.H_SOURCE_INDEX])
            for d in dead] == [(b'{"n":500,"deep":' + nested(300) + b"}", b"STORE_REFUSED",
                                b"1")]
    running.task.result()


async def test_a_header_with_a_null_value_counts_as_absent(gateway, storage_url):
    """Kafka allows a header without a value (None in aiokafka): decoding one stopped the
    worker (None has no decode), its replacement too, at the same record for ever. It counts
    as absent; a dead letter keeps the source record's headers as they were."""
    body = b'[{"region": "North", "revenue": 1}, {"region": "South", "revenue": "lots"}]'
    await produce(gateway.bootstrap, gateway.topic, body,
                  [(r.H_REQUEST_ID, None), (r.H_CONNECTOR, b"pos"), ("trace", None)])
    async with Running(gateway, storage_url) as running:
        await wait_for(lambda: _equals(count(storage_url), 1), timeout=30)
        await wait_for(lambda: _positive(running.worker.batches))
    assert await rows(storage_url, "SELECT region, _request_id, _connector FROM sales") == [
        ("North", None, "pos")]
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(gateway.topic))
    assert [(d.value, list(d.headers[:3])) for d in dead] == [
        (b'{"region":"South","revenue":"lots"}',
         [(r.H_REQUEST_ID, None), (r.H_CONNECTOR, b"pos"), ("trace", None)])]
    running.task.result()


async def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_the_partition_flows(
        gateway, tmp_path):
    """Kafka's header keys are strings, but librdkafka and others write any bytes, and
    aiokafka decodes them strictly: a record with such a key made the fetch (getmany) raise
    UnicodeDecodeError, the worker stopped before committing and its replacement met the
    same record, for good. The record is dead-lettered (its value, its other headers, the
    key with \\x escapes) and its partition moves past it alone: every other record of
    its fetch, of its record batch and of the other partition is stored once, and the
    offsets are committed to the end."""
    storage = f"sqlite:///{tmp_path}/keys.db"
    topic = await _dataset(gateway, "plain", "schema: {type: object, properties: "
                           "{n: {type: integer}}}\n", partitions=2)
    await produce_batch(gateway.bootstrap, topic, 0, [(b'{"n": 1}', [])])
    await produce_batch(gateway.bootstrap, topic, 0, [  # one record batch, the middle one bad
        (b'{"n": 2}', []),
        (b'{"n": 3}', [(b"\xff\xfek", b"v"), ("trace", b"t-1"), (r.H_CONNECTOR, b"pos")]),
        (b'{"n": 4}', [])])
    await produce_batch(gateway.bootstrap, topic, 0, [(b'{"n": 5}', [])])
    await produce_batch(gateway.bootstrap, topic, 1, [
        (b'{"n": 10}', []), (b'[{"n": 11}, {"n": 12}]', [(b"id-\xc3\x28", None)])],
        compression=1)  # gzip
    await produce_batch(gateway.bootstrap, topic, 1, [(b'{"n": 13}', [])])
    ends = {TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 3}
    async with Running(gateway, storage) as running:
        async def committed() -> bool:
            consumer = running.worker.consumer
            return consumer is not None and all(
                [await consumer.committed(tp) == end for tp, end in ends.items()])

        await wait_for(lambda: _equals(count(storage, "plain"), 6), timeout=30)
        await wait_for(committed, timeout=30)
        await asyncio.sleep(0.5)  # nothing more comes
    running.task.result()
    assert sorted(await rows(storage, "SELECT n FROM plain")) == [
        (1,), (2,), (4,), (5,), (10,), (13,)]  # each once
    dead = sorted(await consume_all(gateway.bootstrap, r.dlq_topic(topic)),
                  key=lambda d: dict(d.headers)[r.H_SOURCE_PARTITION])
    assert [(d.value, dict(d.headers)[r.H_ERROR_CODE], dict(d.headers)[r.H_SOURCE_PARTITION],
             dict(d.headers)[r.H_SOURCE_OFFSET]) for d in dead] == [
        (b'{"n": 3}', b"MALFORMED_HEADER", b"0", b"2"),
        (b'[{"n": 11}, {"n": 12}]', b"MALFORMED_HEADER", b"1", b"1")]
    assert list(dead[0].headers[:3]) == [
        ("\\xff\\xfek", b"v"), ("trace", b"t-1"), (r.H_CONNECTOR, b"pos")]
    assert dict(dead[0].headers)[r.H_ERROR] == (
        b"a header key is not UTF-8: b'\\xff\\xfek' (in this letter: \\xff\\xfek)")
    assert list(dead[1].headers[:1]) == [("id-\\xc3(", None)]


async def test_records_of_another_partition_in_the_failed_fetch_are_not_lost(gateway, tmp_path):
    """aiokafka drains one partition after another in a getmany: when it meets a header key
    that is not UTF-8 it has already moved the partitions drained before past the records it
    took from them, and the exception loses those records. The worker puts each partition
    back where its batch leaves it, so the next poll gives them."""
    storage = f"sqlite:///{tmp_path}/drained.db"
    topic = await _dataset(gateway, "plain", "schema: {type: object, properties: "
                           "{n: {type: integer}}}\n", partitions=2)
    good, bad = TopicPartition(topic, 0), TopicPartition(topic, 1)
    await produce_batch(gateway.bootstrap, topic, 0, [(b'{"n": 1}', []), (b'{"n": 2}', [])])
    worker = Running(gateway, storage).worker
    try:
        await worker._start()
        consumer = worker.consumer

        async def fetched(tp: TopicPartition, end: int) -> bool:
            return consumer.highwater(tp) == end

        await wait_for(lambda: fetched(good, 2))  # fetched, and so drained first: then
        await produce_batch(gateway.bootstrap, topic, 1, [  # the other partition's records
            (b'{"n": 10}', []), (b'{"n": 11}', [(b"\xff", b"v")]), (b'{"n": 12}', [])])
        await wait_for(lambda: fetched(bad, 3))
        batch = await worker._poll()  # the first getmany drains partition 0, then raises
        assert [(rec.partition, rec.offset) for rec in batch] == [(1, 0), (1, 2), (1, 1)]
        await worker._handle(batch)
        batch = await worker._poll()
        assert [(rec.partition, rec.offset) for rec in batch] == [(0, 0), (0, 1)]
        await worker._handle(batch)
        assert sorted(await rows(storage, "SELECT n FROM plain")) == [(1,), (2,), (10,), (12,)]
        assert {tp: await consumer.committed(tp) for tp in (good, bad)} == {good: 2, bad: 3}
    finally:
        await _stopped(worker)
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(topic))
    assert [(d.value, dict(d.headers)[r.H_SOURCE_OFFSET]) for d in dead] == [
        (b'{"n": 11}', b"1")]


@contextlib.asynccontextmanager
async def _skipping_while_a_member_joins(gateway, tmp_path, monkeypatch, *, same_topic: bool,
                                         **options):
    """A worker started by hand whose partition of dataset plain's topic has offsets 0-1
    fetched and, in one record batch after them, 2, 3 (a header key b"\\xff") and 4. A
    consumer (``options``) of that topic, or else of another one, joins the worker's group
    right after the skip's raw fetch. Yields (worker, that consumer, the partition, the
    storage URL)."""
    storage = f"sqlite:///{tmp_path}/skip-rebalance.db"
    topic = await _dataset(gateway, "plain", "schema: {type: object, properties: "
                           "{n: {type: integer}}}\n")
    tp = TopicPartition(topic, 0)
    await produce_batch(gateway.bootstrap, topic, 0, [(b'{"n": 1}', []), (b'{"n": 2}', [])])
    running = Running(gateway, storage, WORKER_BATCH_MS="8000")
    worker = running.worker
    joining = AIOKafkaConsumer(topic if same_topic else r.dlq_topic(topic),
                               bootstrap_servers=gateway.bootstrap,
                               group_id=running.settings.group_id, enable_auto_commit=False,
                               session_timeout_ms=3000, heartbeat_interval_ms=1000, **options)
    find, joined = unreadable._find, asyncio.Event()

    async def found_then_rebalanced(*args):
        found = await find(*args)
        if not joined.is_set():
            joined.set()
            await joining.start()
        return found

    monkeypatch.setattr(unreadable, "_find", found_then_rebalanced)
    try:
        await worker._start()
        consumer = worker.consumer

        async def fetched() -> bool:
            return consumer.highwater(tp) == 2

        await wait_for(fetched)  # the first poll's getmany gives these two
        await produce_batch(gateway.bootstrap, topic, 0, [
            (b'{"n": 3}', []), (b'{"n": 4}', [(b"\xff", b"v")]), (b'{"n": 5}', [])])
        yield worker, joining, tp, storage
        assert joined.is_set()
    finally:
        await joining.stop()
        await _stopped(worker)


async def test_a_rebalance_while_an_unreadable_record_is_skipped_loses_no_record(
        gateway, tmp_path, monkeypatch):
    """Skipping a record the client cannot read takes the records before it from aiokafka
    after a raw fetch. A rebalance in between (a member joins the group) puts the partition
    back at its committed offset: aiokafka then gave records the batch already held instead
    of those before the record, and the partition moved past the record batch all the same,
    so those records were never stored and their offsets were committed."""
    async with _skipping_while_a_member_joins(gateway, tmp_path, monkeypatch,
                                              same_topic=False) as (worker, _, tp, storage):
        batch = await worker._poll()  # the second getmany raises
        assert sorted(rec.offset for rec in batch) == [0, 1, 2, 3, 4]
        await worker._handle(batch)
        assert sorted(await rows(storage, "SELECT n FROM plain")) == [(1,), (2,), (3,), (5,)]
        assert await worker.consumer.committed(tp) == 5
    dead = await consume_all(gateway.bootstrap, r.dlq_topic(tp.topic))
    assert [(d.value, dict(d.headers)[r.H_SOURCE_OFFSET]) for d in dead] == [
        (b'{"n": 4}', b"3")]


async def test_a_partition_a_rebalance_takes_while_a_record_is_skipped_is_left_to_its_owner(
        gateway, tmp_path, monkeypatch):
    """A rebalance that gives the partition of a record the client cannot read to another
    member while the worker skips it: aiokafka gives the worker none of its records any
    more, and the skip waited 10 s for them, then stopped the worker (Unskippable). The
    poll now ends with the batch it had; the member that has the partition meets the
    record."""
    # its client id sorts before the worker's: the range assignor gives it the one partition
    async with _skipping_while_a_member_joins(
            gateway, tmp_path, monkeypatch, same_topic=True, client_id="a") as (
            worker, joining, tp, _):
        started = time.monotonic()
        batch = await worker._poll()  # the second getmany raises
        assert tp in joining.assignment() and tp not in worker.consumer.assignment()
        assert [rec.offset for rec in batch if rec.topic == tp.topic] == [0, 1]
        assert time.monotonic() - started < 8


async def test_header_less_kafka_record_is_stored_as_connector_kafka(gateway, storage_url):
    await produce(gateway.bootstrap, gateway.topic, b'{"region": "Kafka", "revenue": "12.5"}')
    async with Running(gateway, storage_url):
        await wait_for(lambda: _equals(count(storage_url), 1))
    got = await rows(storage_url, "SELECT region, revenue, _connector, _request_id FROM sales")
    assert got == [("Kafka", 12.5, "kafka", None)]
    kafka = (await stats(gateway))["connectors"]["kafka"]
    assert kafka["received"] == 1 and kafka["accepted"] == 1 and kafka["written"] == 1


async def test_batches_stop_growing_at_their_byte_bound(gateway, storage_url):
    from prometheus_client import REGISTRY

    def batches() -> float:
        return REGISTRY.get_sample_value("sluice_worker_batch_duration_seconds_count") or 0

    value = orjson.dumps([{"region": f"r{i}", "revenue": i, "note": "x" * 100}
                          for i in range(5)])  # ~700 bytes
    for _ in range(10):
        await produce(gateway.bootstrap, gateway.topic, value)
    before = batches()
    async with Running(gateway, storage_url, WORKER_BATCH_MAX_BYTES="1024",
                       WORKER_BATCH_MS="2000"):
        await wait_for(lambda: _equals(count(storage_url), 5))  # upserts: 5 regions
        await wait_for(lambda: _at_least(lambda: stats(gateway), 50))  # every event's fate
    # 10 records of ~700 bytes with a bound of 1 KiB: never all in one or two batches
    assert batches() - before >= 4


async def _at_least(read, events: int) -> bool:
    kafka = (await read())["connectors"].get("kafka", {})
    return sum(kafka.get(k, 0) for k in ("written", "duplicates", "failed")) >= events


async def test_logs_and_statistics_match_what_was_sent(gateway, tmp_path):
    storage = f"sqlite:///{tmp_path}/stats.db"
    ok = await gateway.post(orjson.dumps(ITEMS), **{"X-Request-ID": "req-ok"})
    partial = await gateway.post(
        orjson.dumps([{"region": "A", "revenue": 1}, {"region": "B", "revenue": -1},
                      {"region": "C", "revenue": 3}]),
        query="?partial=true", **{"X-Request-ID": "req-partial"})
    strict = await gateway.post(orjson.dumps([{"revenue": 1}]), **{"X-Request-ID": "req-bad"})
    replay_1 = await gateway.post(orjson.dumps(ITEMS[:1]), **{"Idempotency-Key": "once"})
    replay_2 = await gateway.post(orjson.dumps(ITEMS[:1]), **{"Idempotency-Key": "once"})
    assert [ok.status, partial.status, strict.status, replay_1.status, replay_2.status] == [
        202, 202, 400, 202, 202]
    async with Running(gateway, storage):
        await wait_for(lambda: _equals(count(storage), 4))  # North (twice), South, A, C
        await asyncio.sleep(0.3)  # the gateway's outcomes flush every 0.2 s
    totals = (await stats(gateway))["totals"]
    assert {k: totals[k] for k in ("requests", "received", "accepted", "rejected", "replayed",
                                   "written", "duplicates", "failed")} == {
        "requests": 5, "received": 2 + 3 + 1 + 1, "accepted": 2 + 2 + 1, "rejected": 1 + 1,
        "replayed": 1, "written": 5, "duplicates": 0, "failed": 0}
    assert totals["bytes"] > 0 and totals["first_event_at"] <= totals["last_event_at"]
    resp = await gateway.client.get("/v1/connectors/pos/logs?size=10",
                                    headers={"Authorization": f"Bearer {gateway.key}"})
    log = await resp.json()
    assert log["total"] == 4  # the replay is not a new request
    by_id = {e["request_id"]: e for e in log["entries"]}
    assert by_id["req-ok"]["status"] == "processed"
    assert (by_id["req-ok"]["items_received"], by_id["req-ok"]["items_written"]) == (2, 2)
    assert by_id["req-partial"]["status"] == "partially failed"
    assert by_id["req-partial"]["items_rejected"] == 1
    assert by_id["req-partial"]["errors"][0]["index"] == 1
    assert by_id["req-bad"]["status"] == "failed"
    assert by_id["req-bad"]["http_status"] == 400
    assert by_id["req-bad"]["code"] == "VALIDATION_FAILED"
    assert log["entries"][0]["timestamp"] >= log["entries"][-1]["timestamp"]


async def test_read_apis_need_a_key_for_the_dataset(gateway):
    other = {"Authorization": f"Bearer {gateway.other_key}"}
    resp = await gateway.client.get("/v1/datasets/sales/stats", headers=other)
    assert resp.status == 403
    resp = await gateway.client.get("/v1/connectors/pos/logs", headers=other)
    assert resp.status == 403 and (await resp.json())["code"] == "FORBIDDEN"
    resp = await gateway.client.get("/v1/connectors/nobody/logs", headers=other)
    assert resp.status == 404
    for query in ("size=0", f"from={2**91}"):  # the second was a 503 (Redis refused it)
        resp = await gateway.client.get(f"/v1/connectors/pos/logs?{query}",
                                        headers={"Authorization": f"Bearer {gateway.key}"})
        assert resp.status == 400 and (await resp.json())["code"] == "INVALID_PARAMETER"


async def test_a_reload_that_would_change_a_column_type_keeps_the_catalogue_it_has(
        gateway, tmp_path, caplog):
    """A schema edit that would change a stored column's type cannot be applied live: each
    reload logs it and the worker keeps storing with the catalogue it has; once the edit is
    undone (or the column migrated), later changes are picked up again. (The reload task used
    to die on it, silently, and no later change was ever picked up.)"""
    storage = f"sqlite:///{tmp_path}/conflict.db"
    sales = gateway.settings.catalogue_dir / "sales.yaml"
    original = sales.read_text()
    body = orjson.dumps([{"region": f"conflict-{j}", "revenue": j} for j in range(5)])
    assert (await gateway.post(body)).status == 202
    async with Running(gateway, storage, WORKER_CATALOGUE_RELOAD_S="0.5") as running:
        await wait_for(lambda: _equals(count(storage), 5))
        edited = yaml.safe_load(original)
        edited["schema"]["properties"]["revenue"] = {"type": "string"}  # was a number
        sales.write_text(yaml.safe_dump(edited))
        await wait_for(lambda: _logged(caplog, "revenue"))
        body = orjson.dumps([{"region": f"still-{j}", "revenue": j} for j in range(5)])
        assert (await gateway.post(body)).status == 202
        await wait_for(lambda: _equals(count(storage), 10))  # the previous catalogue, still
        sales.write_text(original)
        topic = f"ingest.fresh.{uuid.uuid4().hex[:8]}"
        await create_topics(gateway.bootstrap, [topic], partitions=1)
        (gateway.settings.catalogue_dir / "fresh.yaml").write_text(
            f"id: fresh\nentry_topic: {topic}\nschema: {{type: object}}\n")
        await produce(gateway.bootstrap, topic, b'[{"n": 1}]')
        await wait_for(lambda: _equals(count(storage, "fresh"), 1), timeout=30)
        assert not running.task.done()
    running.task.result()


async def _waiting_for_a_lock(postgres_url: str) -> bool:
    return bool(await rows(postgres_url, "SELECT 1 FROM pg_stat_activity WHERE datname = "
                           "current_database() AND wait_event_type = 'Lock'"))


async def test_a_catalogue_reload_during_a_batch_leaves_each_value_in_its_column(
        kafka, redis_url, postgres_url, tmp_path):
    """A batch is shaped and written with the catalogue it started with, whatever a reload
    does meanwhile. The reload used to hand the sinks the new statements at once, and the
    batch the new structures for the datasets it had not written yet: a field renamed from b
    to c put the batch's b values in c, silently, and a dataset removed raised KeyError.
    Deterministic: the test holds the fence row of the batch's first dataset, so the batch
    waits in its first write (seen in pg_stat_activity) while the reload runs, and goes on
    once the test lets go."""
    suffix = uuid.uuid4().hex[:8]
    topics = {name: f"ingest.{name}.{suffix}" for name in ("first", "second", "gone")}
    await create_topics(kafka.bootstrap, list(topics.values()), partitions=1)
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()

    def define(name: str, field: str) -> None:
        (catalogue / f"{name}.yaml").write_text(yaml.safe_dump({
            "id": name, "entry_topic": topics[name], "schema": {"type": "object", "properties": {
                field: {"type": "integer"}, "note": {"type": "string"}}}}))

    for name, topic in topics.items():
        define(name, "b")
        await produce(kafka.bootstrap, topic,
                      orjson.dumps([{"b": 1, "note": name}, {"b": 2, "note": name}]))
    batch = [rec for topic in topics.values() for rec in await consume_all(kafka.bootstrap, topic)]
    worker = Worker(WorkerSettings.from_env({
        "STORAGE_URL": postgres_url, "SLUICE_CATALOGUE_DIR": str(catalogue),
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
        "REDIS_URL": redis_url}))
    await worker.sink.start()
    holder = await asyncpg.connect(postgres_url)
    try:
        await worker.load_catalogue()
        await holder.execute("INSERT INTO _sluice_offsets VALUES ('first', $1, 0, 0)",
                             topics["first"])
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM _sluice_offsets WHERE table_name = 'first' "
                             "FOR UPDATE")
        processing = asyncio.create_task(worker.process(batch))
        await wait_for(lambda: _waiting_for_a_lock(postgres_url))
        define("first", "c")
        define("second", "c")
        (catalogue / "gone.yaml").unlink()
        await worker._reload_catalogue()
        assert sorted(worker.structures) == [topics["first"], topics["second"]]
        assert worker.structures[topics["second"]].data_names[0] == "c"  # applied
        assert not processing.done()
        await held.rollback()
        outcome = await asyncio.wait_for(processing, 10)
    finally:
        await holder.close()
        await worker.sink.close()
        await worker.redis.aclose()
    assert not outcome.letters
    for name in ("first", "second"):
        assert await rows(postgres_url, f"SELECT b, c, note FROM {name} ORDER BY b") == [
            (1, None, name), (2, None, name)]
    assert await rows(postgres_url, "SELECT b, note FROM gone ORDER BY b") == [
        (1, "gone"), (2, "gone")]


async def _logged(caplog, text: str) -> bool:
    return any("catalogue reload failed" in r.getMessage() and text in r.getMessage()
               for r in caplog.records)


async def test_a_new_dataset_is_consumed_without_a_restart(gateway, tmp_path):
    storage = f"sqlite:///{tmp_path}/new.db"
    topic = f"ingest.fresh.{uuid.uuid4().hex[:8]}"
    await create_topics(gateway.bootstrap, [topic], partitions=1)
    async with Running(gateway, storage, WORKER_CATALOGUE_RELOAD_S="0.5") as running:
        await wait_for(lambda: _positive(len(running.worker.structures)))
        (gateway.settings.catalogue_dir / "fresh.yaml").write_text(
            f"id: fresh\nentry_topic: {topic}\nschema: {{type: object, properties: "
            "{n: {type: integer}}}\n")
        await produce(gateway.bootstrap, topic, b'[{"n": "41"}, {"n": 42}]')
        await wait_for(lambda: _equals(count(storage, "fresh"), 2), timeout=30)
    assert sorted(await rows(storage, "SELECT n FROM fresh")) == [(41,), (42,)]
