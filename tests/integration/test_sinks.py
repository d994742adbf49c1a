"""Sinks against real SQLite and PostgreSQL: typed tables, exactly-once writes, schema growth."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from schemas.dataset import Limits, parse_dataset
from schemas.structure import Structure
from workers.rows import Origin, Row
from workers.sinks import StorageSchemaError, open_sink

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

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


@pytest.fixture
async def sink(storage_url):
    sink = open_sink(storage_url)
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
