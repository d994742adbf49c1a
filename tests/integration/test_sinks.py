"""Sinks against real SQLite and PostgreSQL: typed tables, exactly-once writes, schema growth."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import asyncpg
import pytest

from schemas.dataset import Limits, parse_dataset
from schemas.structure import Structure
from workers.rows import Origin, Row
from workers.sinks import StorageSchemaError, open_sink
from workers.sinks.sqlite import path_of

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WINDOW_S = 86400  # SLUICE_IDEMPOTENCY_TTL_S's default
WINDOW = timedelta(seconds=WINDOW_S)

SCHEMA = {"type": "object", "properties": {
    "region": {"type": "string"}, "revenue": {"type": "number"}, "units": {"type": "integer"},
    "open": {"type": "boolean"}, "day": {"type": "string", "format": "date"},
    "at": {"type": "string", "format": "date-time"},
    "meta": {"type": "object", "properties": {"source": {"type": "string"}}},
    "tags": {"type": "array"}}, "required": ["region"]}


def structure(**extra) -> Structure:
    return Structure(parse_dataset({"id": "sales", "schema": SCHEMA, **extra}, Limits()))


def origin(offset: int, received: datetime = T0, rid: str = "r1", idem: str | None = None,
           partition: int = 0) -> Origin:
    return Origin(rid, "pos", received, None, None, idem, 0, "ingest.sales", partition, offset)


def row(s: Structure, item: dict, o: Origin, index: int = 0) -> Row:
    return Row(s.row_values(item), o, index)


async def read(sink, url: str, sql: str) -> list[tuple]:
    if url.startswith("sqlite"):
        return sink._conn.execute(sql).fetchall()
    async with sink._pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(sql)]


async def execute(sink, url: str, sql: str) -> None:
    if url.startswith("sqlite"):
        with sink._conn:
            sink._conn.execute(sql)
    else:
        async with sink._pool.acquire() as conn:
            await conn.execute(sql)


async def unique_indexes(sink, url: str, table: str) -> int:
    if url.startswith("sqlite"):
        return sum(r[2] for r in await read(sink, url, f"PRAGMA index_list({table})"))
    return (await read(sink, url, "SELECT count(*) FROM pg_index WHERE indisunique AND "
                       f"indrelid = '{table}'::regclass"))[0][0]


@pytest.fixture
async def sink(storage_url):
    sink = open_sink(storage_url, WINDOW_S)
    await sink.start()
    yield sink
    await sink.close()


async def test_typed_columns(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    item = {"region": "North", "revenue": "12.5", "units": "3", "open": "true",
            "day": "2026-01-02", "at": "2026-01-02T03:04:05+01:00", "meta": {"source": "pos"},
            "tags": ["a"], "surprise": 1}
    result = await sink.write(s, [row(s, item, origin(0))])
    assert result.total == 1
    got = (await read(sink, storage_url, "SELECT region, revenue, units, open, day, at, "
                      "meta__source, tags, _extra, _connector FROM sales"))[0]
    if storage_url.startswith("sqlite"):
        assert got == ("North", 12.5, 3, 1, "2026-01-02", "2026-01-02T02:04:05.000000Z",
                       "pos", '["a"]', '{"surprise":1}', "pos")
    else:
        assert got == ("North", 12.5, 3, True, date(2026, 1, 2),
                       datetime(2026, 1, 2, 2, 4, 5, tzinfo=UTC), "pos", ["a"],
                       {"surprise": 1}, "pos")


@pytest.mark.parametrize("item_key", [None, "region"])  # the append path, the merge path
async def test_each_row_keeps_its_records_metadata(sink, storage_url, item_key):
    s = structure(item_key=item_key) if item_key else structure()
    await sink.prepare(s)
    first = origin(7, T0 + timedelta(microseconds=1), rid="r7", partition=1)
    second = origin(8, T0 + timedelta(days=400, seconds=3), rid="r8", partition=1)
    rows = [row(s, {"region": f"{o.offset}-{i}"}, o, i) for o in (first, second) for i in (0, 1)]
    assert (await sink.write(s, rows)).total == 4
    got = await read(sink, storage_url, "SELECT region, _request_id, _received_at, _offset, "
                     "_index FROM sales ORDER BY region")
    if storage_url.startswith("sqlite"):
        stamp = {first: "2026-11-24T12:00:00.000001Z", second: "2027-12-29T12:00:03.000000Z"}
    else:
        stamp = {first: first.received_at, second: second.received_at}
    assert got == [(f"{o.offset}-{i}", o.request_id, stamp[o], o.offset, i)
                   for o in (first, second) for i in (0, 1)]


async def test_redelivery_stores_nothing_twice(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    rows = [row(s, {"region": f"r{i}"}, origin(i)) for i in range(5)]
    assert (await sink.write(s, rows)).total == 5
    assert (await sink.write(s, rows[2:])).total == 0
    assert (await read(sink, storage_url, "SELECT count(*) FROM sales"))[0][0] == 5


async def test_idempotency_key_retries_store_once(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    first = [row(s, {"region": "a"}, origin(0, idem="k1"))]
    retry = [row(s, {"region": "a"}, origin(7, idem="k1", rid="r2"))]  # new offset, same key
    other = [row(s, {"region": "a"}, origin(8, idem="k2", rid="r3"))]
    assert (await sink.write(s, first)).total == 1
    assert (await sink.write(s, retry)).total == 0
    assert (await sink.write(s, other)).written == {"r3": 1}


async def test_append_tables_check_nothing_per_row(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    assert await unique_indexes(sink, storage_url, "sales") == 0
    await sink.write(s, [row(s, {"region": "a"}, origin(3))])
    fences = await read(sink, storage_url, "SELECT table_name, topic, partition, next_offset "
                        "FROM _sluice_offsets")
    assert fences == [("sales", "ingest.sales", 0, 4)]


async def test_fences_are_per_partition(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    assert (await sink.write(s, [row(s, {"region": "a"}, origin(50))])).total == 1
    late = [row(s, {"region": "b"}, origin(2, partition=1)),
            row(s, {"region": "c"}, origin(49))]  # partition 0 is past 49 already
    assert (await sink.write(s, late)).total == 1
    assert await read(sink, storage_url, "SELECT region FROM sales ORDER BY region") == [
        ("a",), ("b",)]


async def test_one_key_twice_in_one_batch_stores_the_first_record(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    o1, o2 = origin(4, idem="k1", rid="r1"), origin(9, idem="k1", rid="r2", partition=1)
    rows = [row(s, {"region": "a"}, o1, 0), row(s, {"region": "b"}, o1, 1),
            row(s, {"region": "a"}, o2, 0), row(s, {"region": "b"}, o2, 1)]
    assert (await sink.write(s, rows)).written == {"r1": 2}
    assert (await read(sink, storage_url, "SELECT count(*) FROM sales"))[0][0] == 2


async def test_an_idempotency_key_reused_after_the_window_is_a_new_request(sink, storage_url):
    """The gateway forgets a key SLUICE_IDEMPOTENCY_TTL_S after its request, and a client may
    then send it again with new data: stored (it used to be skipped as a copy, for ever).
    Copies of each request, within the window of its receive time, are still stored once."""
    s = structure()
    await sink.prepare(s)

    def request(offset: int, received: datetime, region: str) -> list[Row]:
        return [row(s, {"region": region}, origin(offset, received, f"r{offset}", "k"))]

    assert (await sink.write(s, request(0, T0, "first"))).total == 1
    assert (await sink.write(s, request(1, T0 + WINDOW, "copy"))).total == 0  # at the edge
    later = T0 + WINDOW + timedelta(milliseconds=1)
    assert (await sink.write(s, request(2, later, "second"))).written == {"r2": 1}
    # the recorded time moved to the second request: its copies are copies, a window on
    assert (await sink.write(s, request(3, later + WINDOW, "copy"))).total == 0
    assert (await sink.write(s, request(4, T0 + 2 * WINDOW, "copy"))).total == 0
    assert await read(sink, storage_url, "SELECT region FROM sales ORDER BY _offset") == [
        ("first",), ("second",)]


async def test_one_batch_with_a_request_its_copy_and_the_key_reused_stores_two(sink,
                                                                                storage_url):
    """Workers that lag a window behind hold them in one batch: each decided in turn."""
    s = structure()
    await sink.prepare(s)
    assert (await sink.write(s, [row(s, {"region": "old"}, origin(0, T0, "r0", "k"))])).total
    batch = [row(s, {"region": region}, origin(n, T0 + at, f"r{n}", "k", partition=n % 2))
             for n, (region, at) in enumerate([
                 ("copy", WINDOW), ("new", WINDOW + timedelta(seconds=1)),
                 ("its copy", 2 * WINDOW), ("newer", 2 * WINDOW + timedelta(seconds=2))], 1)]
    assert (await sink.write(s, batch)).written == {"r2": 1, "r4": 1}
    assert await read(sink, storage_url, "SELECT region FROM sales ORDER BY _offset") == [
        ("old",), ("new",), ("newer",)]


async def test_keys_recorded_by_an_earlier_version_are_kept_for_a_window_from_the_migration(
        tmp_path, storage_url):
    """A _sluice_idempotency created before receive times were kept gets the column at
    start, its keys the time of the migration: a late copy is still a copy, for a window."""
    old = ("CREATE TABLE _sluice_idempotency (table_name text NOT NULL, connector text NOT "
           "NULL, idempotency_key text NOT NULL, part integer NOT NULL, stored_at {} NOT NULL "
           "DEFAULT {}, PRIMARY KEY (table_name, connector, idempotency_key, part))")
    recorded = ("INSERT INTO _sluice_idempotency (table_name, connector, idempotency_key, "
                "part) VALUES ('sales', 'pos', 'k', 0)")
    if storage_url.startswith("sqlite"):
        conn = sqlite3.connect(path_of(storage_url))
        with conn:
            conn.execute(old.format("TEXT", "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"))
            conn.execute(recorded)
        conn.close()
    else:
        conn = await asyncpg.connect(storage_url)
        await conn.execute(old.format("timestamp with time zone", "now()"))
        await conn.execute(recorded)
        await conn.close()
    before = datetime.now(UTC)
    sink = open_sink(storage_url, WINDOW_S)
    await sink.start()
    try:
        s = structure()
        await sink.prepare(s)
        after = datetime.now(UTC)
        (migrated,) = await read(sink, storage_url, "SELECT received_ms FROM "
                                 "_sluice_idempotency")
        assert int(before.timestamp() * 1000) - 1 <= migrated[0] <= after.timestamp() * 1000
        late = [row(s, {"region": "late copy"}, origin(0, after + WINDOW - timedelta(
            seconds=5), idem="k"))]
        assert (await sink.write(s, late)).total == 0
        again = [row(s, {"region": "new"}, origin(1, after + WINDOW + timedelta(seconds=1),
                                                 rid="r2", idem="k"))]
        assert (await sink.write(s, again)).written == {"r2": 1}
        await sink.prepare(s)  # a second start: nothing more to migrate
        assert await read(sink, storage_url, "SELECT region FROM sales") == [("new",)]
    finally:
        await sink.close()


async def test_idempotency_keys_two_windows_old_are_pruned(sink, storage_url):
    """A key decides records received up to a window after it; pruning those two windows old
    leaves a window for the workers' lag. Other datasets' keys are left to their workers."""
    s = structure()
    await sink.prepare(s)
    now = T0 + 3 * WINDOW
    ages = {"old": 2 * WINDOW + timedelta(milliseconds=1), "edge": 2 * WINDOW,
            "young": WINDOW}
    await sink.write(s, [row(s, {"region": k}, origin(n, now - age, f"r{n}", k))
                         for n, (k, age) in enumerate(ages.items())])
    await execute(sink, storage_url, "INSERT INTO _sluice_idempotency (table_name, connector, "
                  "idempotency_key, part, received_ms) VALUES ('other', 'pos', 'old', 0, 0)")
    now_ms = int(now.timestamp() * 1000)
    assert await sink.prune(now_ms, chunk=1) == 1  # in chunks, each its own transaction
    assert await read(sink, storage_url, "SELECT table_name, idempotency_key FROM "
                      "_sluice_idempotency ORDER BY received_ms") == [
        ("other", "old"), ("sales", "edge"), ("sales", "young")]
    assert await sink.prune(now_ms) == 0
    late = [row(s, {"region": "x"}, origin(5, now - WINDOW, idem="old"))]
    assert (await sink.write(s, late)).total == 1  # no longer known: stored


class FenceHolder:
    """The partition's previous owner, inside its write transaction: holds the fence row."""

    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self) -> FenceHolder:
        if self.url.startswith("sqlite"):
            self.conn = sqlite3.connect(path_of(self.url), isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")  # SQLite's one write lock
        else:
            self.conn = await asyncpg.connect(self.url)
            self.tx = self.conn.transaction()
            await self.tx.start()
            await self.conn.fetch("SELECT * FROM _sluice_offsets FOR UPDATE")
        return self

    async def commit_fence(self, next_offset: int) -> None:
        sql = f"UPDATE _sluice_offsets SET next_offset = {next_offset}"
        if self.url.startswith("sqlite"):
            self.conn.execute(sql)
            self.conn.execute("COMMIT")
        else:
            await self.conn.execute(sql)
            await self.tx.commit()

    async def __aexit__(self, *exc) -> None:
        if self.url.startswith("sqlite"):
            self.conn.close()
        else:
            await self.conn.close()


async def test_a_writer_waits_for_the_fence_the_previous_owner_holds(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    await sink.write(s, [row(s, {"region": "first"}, origin(0))])  # the fence row exists
    batch = [row(s, {"region": f"r{i}"}, origin(i, rid=f"q{i}")) for i in range(1, 301)]
    # after a rebalance: the old owner is still writing records 1..300 when the new one
    # (this sink) is handed the same records
    async with FenceHolder(storage_url) as old_owner:
        new_owner = asyncio.ensure_future(sink.write(s, batch))
        await asyncio.sleep(0.5)
        assert not new_owner.done()  # waits for the fence instead of reading a stale one
        await old_owner.commit_fence(301)
        assert (await asyncio.wait_for(new_owner, 10)).total == 0
    assert (await read(sink, storage_url, "SELECT count(*) FROM sales"))[0][0] == 1


async def test_tables_from_before_fences_keep_their_unique_key(sink, storage_url):
    s = structure()
    await sink.prepare(s)
    await execute(sink, storage_url, 'CREATE UNIQUE INDEX old_key ON sales '
                  '(_topic, _partition, _offset, _index)')
    legacy = open_sink(storage_url, WINDOW_S)
    await legacy.start()
    try:
        await legacy.prepare(s)
        rows = [row(s, {"region": f"r{i}"}, origin(i)) for i in (5, 3)]
        assert (await legacy.write(s, rows[:1])).total == 1
        assert (await legacy.write(s, rows)).total == 1  # offset 3: new to the unique key
        retry = [row(s, {"region": "x"}, origin(8, idem="k")),
                 row(s, {"region": "x"}, origin(9, idem="k", rid="r2"))]
        assert (await legacy.write(s, retry)).written == {"r1": 1}
        assert await unique_indexes(legacy, storage_url, "sales") == 2
    finally:
        await legacy.close()


async def test_item_key_last_writer_wins_on_receive_time(sink, storage_url):
    s = structure(item_key="region")
    await sink.prepare(s)
    newer = row(s, {"region": "North", "revenue": 2}, origin(5, T0 + timedelta(seconds=1)))
    older = row(s, {"region": "North", "revenue": 1}, origin(9, T0, rid="old", partition=1))
    assert (await sink.write(s, [newer])).total == 1
    assert (await sink.write(s, [older])).total == 0  # reordered older write: ignored
    assert (await sink.write(s, [newer])).total == 0  # redelivery: ignored
    assert await read(sink, storage_url, "SELECT region, revenue FROM sales") == [("North", 2.0)]
    newest = row(s, {"region": "North", "revenue": 3}, origin(10, T0 + timedelta(seconds=2)))
    assert (await sink.write(s, [newest])).total == 1
    assert await read(sink, storage_url, "SELECT revenue FROM sales") == [(3.0,)]


async def test_event_id_counts_once(sink, storage_url):
    s = structure(event_id="region")
    await sink.prepare(s)
    assert (await sink.write(s, [row(s, {"region": "e1"}, origin(0))])).total == 1
    assert (await sink.write(s, [row(s, {"region": "e1"}, origin(1))])).total == 0


async def test_schema_growth_adds_columns_and_type_changes_stop(sink, storage_url):
    await sink.prepare(structure())
    grown = {**SCHEMA, "properties": {**SCHEMA["properties"], "note": {"type": "string"}}}
    s2 = Structure(parse_dataset({"id": "sales", "schema": grown}, Limits()))
    await sink.prepare(s2)
    await sink.write(s2, [row(s2, {"region": "x", "note": "hi"}, origin(0))])
    assert await read(sink, storage_url, "SELECT note FROM sales") == [("hi",)]
    changed = {**SCHEMA, "properties": {**SCHEMA["properties"], "units": {"type": "string"}}}
    s3 = Structure(parse_dataset({"id": "sales", "schema": changed}, Limits()))
    with pytest.raises(StorageSchemaError, match="units"):
        await sink.prepare(s3)


@pytest.mark.parametrize("extra", [{}, {"event_id": "units"}])  # append path, merge path
async def test_rows_shaped_before_a_reload_go_to_their_own_columns(sink, storage_url, extra):
    """A worker writes a batch with the structure that shaped it, while a catalogue reload
    may have prepared a newer one meanwhile (or prepared it and then failed at another
    dataset, so the worker keeps the one it has): its rows go to their own columns. The
    sinks used to write them with the statement of the structure prepared last: a field
    renamed from region to area took the older rows' regions."""
    before = structure(**extra)
    renamed = {**SCHEMA, "required": ["area"], "properties": {
        "area" if name == "region" else name: kind for name, kind in SCHEMA["properties"].items()}}
    after = Structure(parse_dataset({"id": "sales", "schema": renamed, **extra}, Limits()))
    await sink.prepare(before)
    await sink.prepare(after)
    assert (await sink.write(before, [row(before, {"region": "North", "units": 3},
                                          origin(0))])).total == 1
    assert (await sink.write(after, [row(after, {"area": "South", "units": 4},
                                         origin(1))])).total == 1
    assert await read(sink, storage_url, "SELECT region, area, units FROM sales "
                      "ORDER BY _offset") == [("North", None, 3), (None, "South", 4)]


async def test_columns_differing_only_in_case_are_refused_by_sqlite_alone(sink, storage_url):
    """SQLite takes them for one name (its CREATE or ALTER failed, stopping the worker with a
    traceback); PostgreSQL keeps both."""
    both = {**SCHEMA, "properties": {**SCHEMA["properties"], "Region": {"type": "string"}}}
    s = Structure(parse_dataset({"id": "sales", "schema": both}, Limits()))
    if not storage_url.startswith("sqlite"):
        await sink.prepare(s)
        await sink.write(s, [row(s, {"region": "a", "Region": "b"}, origin(0))])
        assert await read(sink, storage_url, 'SELECT region, "Region" FROM sales') == [
            ("a", "b")]
        return
    with pytest.raises(StorageSchemaError, match="columns region and Region differ only in case"):
        await sink.prepare(s)
    await sink.prepare(structure())
    renamed = {**SCHEMA, "properties": {**SCHEMA["properties"], "Units": {"type": "integer"}}}
    del renamed["properties"]["units"]
    with pytest.raises(StorageSchemaError, match="columns units and Units differ only in case"):
        await sink.prepare(Structure(parse_dataset({"id": "sales", "schema": renamed}, Limits())))


async def test_postgres_timestamps_encode_as_asyncpg_does(postgres_url):
    """The sink's own timestamptz codec writes and reads exactly what asyncpg's does."""
    from zoneinfo import ZoneInfo

    from workers.sinks.postgres import _init_connection

    values = [T0, datetime(2026, 11, 24, 12, 0, 0, 999_999, tzinfo=UTC),
              datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),  # before the PG epoch
              datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_999, UTC),
              datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris")),
              datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
              datetime(2026, 1, 2, 3, 4, 5),  # naive: local time, for both
              datetime.max, datetime.min,  # naive max and min: the infinities, for both
              date(2026, 1, 2)]  # a date: local midnight, for both
    plain = await asyncpg.connect(postgres_url)
    ours = await asyncpg.connect(postgres_url)
    try:
        await _init_connection(ours)
        await plain.execute("CREATE TABLE ts (n int, via text, at timestamptz)")
        for via, conn in (("asyncpg", plain), ("sink", ours)):
            await conn.copy_records_to_table(
                "ts", records=[(n, via, v) for n, v in enumerate(values)])
        differ = await plain.fetch("SELECT a.n FROM ts a JOIN ts b USING (n) WHERE a.via = "
                                   "'asyncpg' AND b.via = 'sink' AND a.at IS DISTINCT FROM b.at")
        assert differ == [] and await plain.fetchval("SELECT count(*) FROM ts") == 2 * len(values)
        assert await plain.fetchval("SELECT count(*) FROM ts WHERE at = 'infinity'") == 4
        read_plain = [r["at"] for r in await plain.fetch("SELECT at FROM ts ORDER BY via, n")]
        read_ours = [r["at"] for r in await ours.fetch("SELECT at FROM ts ORDER BY via, n")]
        assert read_ours == read_plain
        for conn in (plain, ours):  # not a date or datetime: refused the same way
            with pytest.raises(asyncpg.DataError, match=r"expected a datetime\.date or datetime"):
                await conn.execute("INSERT INTO ts VALUES (0, 'x', $1)", "2026-01-01")
    finally:
        await plain.close()
        await ours.close()


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
async def test_sqlite_commits_are_durable_across_power_loss(sink):
    """WAL with synchronous=FULL: a commit is on disk before the offsets after it are
    committed in Kafka (with NORMAL, a power loss could roll back a committed batch)."""
    assert sink._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert sink._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


async def write_both_while_held(sink, s, batches: list[list[Row]], hold: str) -> list:
    """Write the batches concurrently while another transaction has run ``hold``; let it go
    once both writes wait, and return their results (a deadlock raises)."""
    holder = await asyncpg.connect(sink.url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute(hold)
        writes = [asyncio.create_task(sink.write(s, batch)) for batch in batches]
        await asyncio.sleep(0.5)  # both wait now, holding what they took before
        assert not any(w.done() for w in writes)
        await held.rollback()
        return await asyncio.gather(*writes)
    finally:
        await holder.close()


@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
async def test_concurrent_merges_of_the_same_keys_wait_instead_of_deadlocking(sink):
    """Two batches update the same items in opposite orders while a third transaction holds
    one of them: unordered, each would take half the row locks and wait for the other's
    half (a deadlock, one batch refused); in key order the second waits for the first."""
    s = structure(item_key="region")
    await sink.prepare(s)
    keys = [f"k{i:03d}" for i in range(200)]
    await sink.write(s, [row(s, {"region": k}, origin(i)) for i, k in enumerate(keys)])
    later = [T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]
    batches = [[row(s, {"region": k, "revenue": n}, origin(1000 * (n + 1) + i, later[n]))
                for i, k in enumerate(order)] for n, order in enumerate((keys, keys[::-1]))]
    results = await write_both_while_held(
        sink, s, batches, "SELECT 1 FROM sales WHERE region = 'k100' FOR UPDATE")
    assert [r.total for r in results] == [200, 200]
    assert await read(sink, sink.url, "SELECT DISTINCT revenue FROM sales") == [(1.0,)]


async def test_a_store_refusal_that_passes_is_storage_busy(sink, storage_url):
    """A deadlock or a lock held too long leaves nothing committed: StorageBusy, which the
    worker retries (the same batch), instead of an error that ends the process."""
    from workers.sinks import StorageBusy

    s = structure(item_key="region")
    await sink.prepare(s)
    if storage_url.startswith("sqlite"):
        sink._conn.execute("PRAGMA busy_timeout = 100")
        blocker = sqlite3.connect(path_of(storage_url))
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        try:
            with pytest.raises(StorageBusy, match="locked"):
                await sink.write(s, [row(s, {"region": "x"}, origin(0))])
            with pytest.raises(StorageBusy, match="locked"):  # a new table, at a worker's start
                await sink.prepare(structure(id="other"))
        finally:
            blocker.rollback()
            blocker.close()
    else:
        async with sink._pool.acquire() as conn:  # a deadlock, as PostgreSQL reports it
            await conn.execute("CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN "
                               "RAISE EXCEPTION 'deadlock detected' USING ERRCODE = "
                               "'40P01'; END $$ LANGUAGE plpgsql")
            await conn.execute("CREATE TRIGGER boom BEFORE INSERT ON sales FOR EACH ROW "
                               "EXECUTE FUNCTION boom()")
        with pytest.raises(StorageBusy, match="DeadlockDetectedError"):
            await sink.write(s, [row(s, {"region": "x"}, origin(0))])
    assert await read(sink, storage_url, "SELECT count(*) FROM sales") == [(0,)]


@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
async def test_concurrent_writers_record_the_same_keys_without_deadlocking(sink):
    """A request published twice may land in two partitions, so two workers record the same
    Idempotency-Keys: in key order, the second waits for the first instead of deadlocking,
    and each key's rows are stored once."""
    s = structure()
    await sink.prepare(s)
    keys = [f"k{i:03d}" for i in range(200)]
    batches = [[row(s, {"region": k}, origin(i, idem=k, rid=f"{p}-{k}", partition=p))
                for i, k in enumerate(order)] for p, order in enumerate((keys, keys[::-1]))]
    results = await write_both_while_held(
        sink, s, batches, "INSERT INTO _sluice_idempotency (table_name, connector, "
        "idempotency_key, part, received_ms) VALUES ('sales', 'pos', 'k100', 0, 0)")
    assert sum(r.total for r in results) == 200
    assert await read(sink, sink.url, "SELECT count(DISTINCT region), count(*) "
                      "FROM sales") == [(200, 200)]


async def test_postgres_refuses_a_database_not_encoded_utf8(postgres_server):
    """A LATIN1 database refuses each batch holding a character it lacks (say an emoji), for
    ever; the worker stops at start instead, saying why (exit code 2)."""
    name = f"sluice_latin1_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_server)
    await admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' "
                        "LC_CTYPE 'C' TEMPLATE template0")
    try:
        sink = open_sink(f"{postgres_server.rpartition('/')[0]}/{name}", WINDOW_S)
        with pytest.raises(StorageSchemaError, match=r"encoded LATIN1; .* needs a UTF8 database"):
            await sink.start()
        await sink.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
