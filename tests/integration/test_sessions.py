"""Ingestion sessions end to end on real Redis, a real Tansu broker, real workers and storage.

Every answer is checked against what reached the entry topic (and, with workers, storage).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
import urllib.parse

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from gateway import sessions as sessions_module
from gateway.config import Settings
from gateway.routes.ingestions import SESSIONS
from gateway.sessions import CreateSpec, Sessions
from schemas import jsontext, redis_keys
from schemas import records as r
from schemas.catalogue import Principal
from schemas.keys import hash_key, new_key
from tests.integration.conftest import with_sales_key
from tests.integration.test_push import assert_problem, nested
from tests.integration.test_workers import Running, count, rows, wait_for

pytestmark = pytest.mark.integration

ADMIN = new_key("ops")
ADMIN_ENV = {"SLUICE_ADMIN_KEYS": f"ops:{hash_key(ADMIN)}"}
COUNTED = ("requests", "received", "accepted", "rejected", "replayed", "rate_limited", "bytes",
           "written", "duplicates", "failed")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sales(prefix: str, n: int) -> list[dict]:
    return [{"region": f"{prefix}-{i}", "revenue": i} for i in range(n)]


async def open_session(gw, key: str | None = None, **fields) -> dict:
    resp = await gw.client.post("/v1/ingestions", data=orjson.dumps(fields or {"dataset": "sales"}),
                                headers={**auth(key or gw.key), "Content-Type": "application/json"})
    assert resp.status == 201, await resp.text()
    doc = await resp.json()
    assert resp.headers["Location"] == f"/v1/ingestions/{doc['ingestion_id']}"
    return doc


async def chunk(gw, sid: str, body, key: str | None = None,
                content_type: str = "application/json", **headers: str):
    data = orjson.dumps(body) if isinstance(body, list | dict) else body
    return await gw.client.post(f"/v1/ingestions/{sid}/chunks", data=data, headers={
        **auth(key or gw.key), "Content-Type": content_type, **headers})


async def status(gw, sid: str, key: str | None = None) -> dict:
    resp = await gw.client.get(f"/v1/ingestions/{sid}", headers=auth(key or gw.key))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def close(gw, sid: str, key: str | None = None):
    return await gw.client.patch(f"/v1/ingestions/{sid}", data=b'{"status": "closed"}',
                                 headers={**auth(key or gw.key),
                                          "Content-Type": "application/json"})


def _events(records) -> list[tuple[dict, bytes | None]]:
    out = []
    for record in sorted(records, key=lambda x: (x.timestamp, x.partition, x.offset)):
        session = dict(record.headers).get(r.H_SESSION_ID)
        out += [(event, session) for event in r.decode_value(record.value)]
    return out


async def published_events(gw) -> list[tuple[dict, bytes | None]]:
    """(event, session-id header) of every event in the sales entry topic, in publish order."""
    return _events(await gw.published())


async def read_events(gw, expected: int, quiet_s: float = 1.0) -> list[tuple[dict, bytes | None]]:
    """Like ``published_events`` when the producer batched several records together: Tansu's
    end offsets then count batches, not records, so read until ``expected`` events arrived
    and the topic stayed quiet for ``quiet_s``."""
    consumer = AIOKafkaConsumer(gw.topic, bootstrap_servers=gw.bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        async with asyncio.timeout(20):
            while len(_events(records)) < expected:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records += batch
        quiet_until = time.monotonic() + quiet_s
        while time.monotonic() < quiet_until:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records += batch
    finally:
        await consumer.stop()
    return _events(records)


def counts(doc: dict) -> dict:
    return {k: doc[k] for k in ("chunks", "chunks_in_flight", "items_received", "items_accepted",
                                "items_rejected", "items_written", "items_failed")}


async def session_stats(gw, sid: str) -> dict:
    resp = await gw.client.get(f"/v1/ingestions/{sid}/stats", headers=auth(gw.key))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_lifecycle_rows_carry_the_session_id(gateway, storage_url):
    before = int(time.time() * 1000)
    doc = await open_session(gateway)
    sid = doc["ingestion_id"]
    assert sid.startswith("ing_") and doc["status"] == "pending" and doc["dataset"] == "sales"
    assert doc["timeout_s"] == 900 and doc["complete"] is False
    assert before - 1000 <= doc["created_at"] <= int(time.time() * 1000) + 1000
    assert doc["expires_at"] == doc["created_at"] + 900_000

    assert (await chunk(gateway, sid, sales("a", 3))).status == 201
    assert (await chunk(gateway, sid, sales("b", 1)[0])).status == 201  # one object
    ndjson = b"\n".join(orjson.dumps(i) for i in sales("c", 2)) + b"\n"
    assert (await chunk(gateway, sid, ndjson, content_type="application/x-ndjson")).status == 201
    gz = await chunk(gateway, sid, gzip.compress(orjson.dumps(sales("d", 4))),
                     **{"Content-Encoding": "gzip"})
    assert gz.status == 201
    assert (await gz.json())["items_accepted"] == 4

    events = await published_events(gateway)
    assert len(events) == 10 and {s for _, s in events} == {sid.encode()}
    async with Running(gateway, storage_url):
        await wait_for(lambda: _written(gateway, sid, 10))
        pending = await status(gateway, sid)
        assert pending["status"] == "pending" and pending["complete"] is False  # not closed yet
        closed = await close(gateway, sid)
        assert closed.status == 200
    done = await closed.json()
    assert done["status"] == "closed" and done["complete"] is True and done["expires_at"] is None
    assert done["closed_at"] >= done["created_at"]
    assert counts(done) == {"chunks": 4, "chunks_in_flight": 0, "items_received": 10,
                            "items_accepted": 10, "items_rejected": 0, "items_written": 10,
                            "items_failed": 0}
    stored = await rows(storage_url, "SELECT region, _session_id FROM sales")
    assert len(stored) == 10 and {s for _, s in stored} == {sid}


async def _written(gw, sid: str, expected: int) -> bool:
    return (await status(gw, sid))["items_written"] == expected


async def test_many_chunks_in_parallel_counts_are_exact(gateway, tmp_path):
    storage = f"sqlite:///{tmp_path}/parallel.db"
    sid = (await open_session(gateway))["ingestion_id"]
    answers = await asyncio.gather(*(chunk(gateway, sid, sales(f"p{i}", 25)) for i in range(40)))
    assert [a.status for a in answers] == [201] * 40
    assert sum([(await a.json())["items_accepted"] for a in answers]) == 1000
    closed = await (await close(gateway, sid)).json()
    assert counts(closed) == {"chunks": 40, "chunks_in_flight": 0, "items_received": 1000,
                              "items_accepted": 1000, "items_rejected": 0, "items_written": 0,
                              "items_failed": 0}
    assert closed["complete"] is False and closed["items_pending"] == 1000
    events = await read_events(gateway, 1000)
    assert len(events) == 1000 and {s for _, s in events} == {sid.encode()}
    assert sorted(e["region"] for e, _ in events) == sorted(
        e["region"] for i in range(40) for e in sales(f"p{i}", 25))
    async with Running(gateway, storage):
        await wait_for(lambda: _complete(gateway, sid))
    final = await status(gateway, sid)
    assert final["items_written"] == 1000 and final["items_pending"] == 0
    assert await count(storage) == 1000


async def _complete(gw, sid: str) -> bool:
    return (await status(gw, sid))["complete"]


async def test_409_after_close_publishes_nothing_and_a_replay_still_answers(gateway):
    sid = (await open_session(gateway))["ingestion_id"]
    first = await chunk(gateway, sid, sales("a", 2), **{"Idempotency-Key": "chunk-1"})
    assert first.status == 201
    once = await close(gateway, sid)
    twice = await close(gateway, sid)
    assert once.status == twice.status == 200
    assert (await once.json())["closed_at"] == (await twice.json())["closed_at"]
    refused = await chunk(gateway, sid, sales("b", 3))
    doc = await assert_problem(refused, 409, "SESSION_CLOSED")
    assert doc["ingestion_id"] == sid and doc["session_status"] == "closed"
    # the retry of a chunk that was answered before the close replays its answer
    replay = await chunk(gateway, sid, sales("a", 2), **{"Idempotency-Key": "chunk-1"})
    assert replay.status == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.read() == await first.read()
    assert [e for e, _ in await published_events(gateway)] == sales("a", 2)
    assert counts(await status(gateway, sid))["chunks"] == 1


async def test_409_after_expiry_and_chunks_restart_the_timer(gateway):
    sid = (await open_session(gateway, dataset="sales", timeout_s=2))["ingestion_id"]
    for i in range(4):  # 3 s in all, longer than the timeout: each chunk restarts it
        assert (await chunk(gateway, sid, sales(f"t{i}", 1))).status == 201
        await asyncio.sleep(0.75)
    assert (await status(gateway, sid))["status"] == "pending"
    await asyncio.sleep(2.3)
    expired = await status(gateway, sid)
    assert expired["status"] == "expired" and expired["expires_at"] <= time.time() * 1000
    assert expired["complete"] is False and expired["items_pending"] == 4  # no worker runs
    doc = await assert_problem(await chunk(gateway, sid, sales("late", 2)), 409,
                               "SESSION_EXPIRED")
    assert doc["session_status"] == "expired"
    closing = await close(gateway, sid)  # harmless: it stays expired
    assert closing.status == 200 and (await closing.json())["status"] == "expired"
    assert [e for e, _ in await published_events(gateway)] == [
        e for i in range(4) for e in sales(f"t{i}", 1)]
    assert counts(await status(gateway, sid))["chunks"] == 4


async def test_chunk_in_flight_while_the_session_closes_completes(make_gateway, own_broker):
    broker = own_broker()
    gw = await make_gateway(bootstrap=broker.bootstrap, KAFKA_PUBLISH_TIMEOUT_S="8")
    sid = (await open_session(gw))["ingestion_id"]
    assert (await chunk(gw, sid, sales("warm", 1))).status == 201  # connected, topic known
    broker.pause()  # the next chunk's publish waits for the broker
    try:
        slow = asyncio.create_task(chunk(gw, sid, sales("slow", 3)))
        await wait_for(lambda: _in_flight(gw, sid), timeout=5, interval=0.05)
        closing = await (await close(gw, sid)).json()
        assert closing["status"] == "closed" and closing["chunks_in_flight"] == 1
        assert closing["complete"] is False
        await assert_problem(await chunk(gw, sid, sales("after", 2)), 409, "SESSION_CLOSED")
        assert not slow.done()
    finally:
        broker.resume()
    answer = await asyncio.wait_for(slow, 10)
    assert answer.status == 201 and (await answer.json())["items_accepted"] == 3
    final = await status(gw, sid)
    assert counts(final) == {"chunks": 2, "chunks_in_flight": 0, "items_received": 4,
                             "items_accepted": 4, "items_rejected": 0, "items_written": 0,
                             "items_failed": 0}
    assert [e for e, _ in await published_events(gw)] == sales("warm", 1) + sales("slow", 3)


async def _in_flight(gw, sid: str) -> bool:
    return (await status(gw, sid))["chunks_in_flight"] == 1


async def test_503_releases_the_chunk_and_counts_nothing(make_gateway, own_broker):
    broker = own_broker()
    gw = await make_gateway(bootstrap=broker.bootstrap, KAFKA_PUBLISH_TIMEOUT_S="2")
    sid = (await open_session(gw))["ingestion_id"]
    assert (await chunk(gw, sid, sales("warm", 1))).status == 201
    broker.stop()
    await assert_problem(await chunk(gw, sid, sales("lost", 2)), 503, "BROKER_UNAVAILABLE")
    after = await status(gw, sid)
    assert after["chunks_in_flight"] == 0 and after["items_accepted"] == 1
    assert after["chunks"] == 1 and after["status"] == "pending"


async def test_413_chunk_limit_and_the_datasets_smaller_limit(make_gateway, gateway):
    small = await make_gateway(SLUICE_CHUNK_MAX_BYTES="2048")
    sid = (await open_session(small))["ingestion_id"]
    doc = await assert_problem(await chunk(small, sid, sales("x" * 40, 60)), 413,
                               "PAYLOAD_TOO_LARGE")
    assert doc["limit"] == 2048

    async def streamed():
        for i in range(40):
            yield orjson.dumps(sales(f"s{i}", 2))[1:-1] + b","

    resp = await small.client.post(f"/v1/ingestions/{sid}/chunks", data=streamed(), headers={
        **auth(small.key), "Content-Type": "application/json"})
    await assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
    assert counts(await status(small, sid))["chunks"] == 0
    assert await small.published() == []

    # the default chunk limit is 1 MiB, but this dataset allows 64 KiB per request
    sid = (await open_session(gateway))["ingestion_id"]
    doc = await assert_problem(await chunk(gateway, sid, sales("y" * 1000, 100)), 413,
                               "PAYLOAD_TOO_LARGE")
    assert doc["limit"] == 64 * 1024
    assert await gateway.published() == []


async def test_failed_records_come_back_with_their_errors_and_the_record(gateway):
    sid = (await open_session(gateway))["ingestion_id"]
    body = [sales("ok", 1)[0], {"region": "East", "revenue": -1}, {"region": "West", "revenue": 2},
            {"revenue": 3}, {"region": "N\x00", "revenue": 4}]  # NUL: no store keeps it
    resp = await chunk(gateway, sid, body)
    assert resp.status == 201
    doc = await resp.json()
    assert (doc["items_received"], doc["items_accepted"], doc["items_rejected"]) == (5, 2, 3)
    assert [f["index"] for f in doc["failed"]] == [1, 3, 4]
    assert doc["failed"][2]["errors"] == [{"path": "$.region", "message": (
        "contains the NUL character (\\u0000), which the stores cannot keep")}]
    assert doc["failed"][0]["record"] == {"region": "East", "revenue": -1}
    assert doc["failed"][0]["errors"][0]["path"] == "$.revenue"
    assert doc["failed"][0]["errors"][0]["message"]
    assert doc["failed"][1]["record"] == {"revenue": 3} and doc["failed_truncated"] is False
    # a failed record nested deeper than orjson encodes (254 levels) is answered back too
    deep = {"region": "Deep", "revenue": nested(300, 1)}
    resp = await chunk(gateway, sid, jsontext.dumps([sales("deep", 1)[0], deep]))
    assert resp.status == 201, await resp.text()
    doc = await resp.json()
    assert doc["items_accepted"] == 1 and doc["failed"][0]["record"] == deep
    # a chunk with nothing valid is processed too: 201, nothing published
    none = await chunk(gateway, sid, [{"revenue": -5}])
    assert none.status == 201 and (await none.json())["items_accepted"] == 0
    # a body that is not JSON is no chunk at all
    await assert_problem(await chunk(gateway, sid, b'[{"region": '), 400, "MALFORMED_JSON")
    assert [e for e, _ in await published_events(gateway)] == [
        body[0], body[2], sales("deep", 1)[0]]
    assert counts(await status(gateway, sid)) == {
        "chunks": 3, "chunks_in_flight": 0, "items_received": 8, "items_accepted": 3,
        "items_rejected": 5, "items_written": 0, "items_failed": 0}


async def test_idempotency_and_rate_limits_work_as_on_the_push_route(make_gateway):
    gw = await make_gateway(rate_limit={"requests_per_second": 0.2, "burst": 4})
    sid = (await open_session(gw, **{"dataset": "sales"}))["ingestion_id"]  # token 1
    first = await chunk(gw, sid, sales("i", 2), **{"Idempotency-Key": "c-1"})  # token 2
    again = await chunk(gw, sid, sales("i", 2), **{"Idempotency-Key": "c-1"})  # token 3
    assert first.status == again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await chunk(gw, sid, sales("j", 1), **{"Idempotency-Key": "c-1"})  # token 4
    await assert_problem(other, 422, "IDEMPOTENCY_KEY_REUSED")
    limited = await chunk(gw, sid, sales("k", 1))
    await assert_problem(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1
    assert [e for e, _ in await published_events(gw)] == sales("i", 2)
    assert counts(await status(gw, sid))["chunks"] == 1


async def test_a_chunk_republished_by_its_retry_is_counted_once(gateway):
    """The process that counted a chunk died before storing its answer (here: the stored
    answer is deleted); the client's retry with the same Idempotency-Key publishes it again,
    and the session counts it once (the workers drop the second copy)."""
    sid = (await open_session(gateway, dataset="sales"))["ingestion_id"]
    assert (await chunk(gateway, sid, sales("r", 2), **{"Idempotency-Key": "c-1"})).status == 201
    client = Redis.from_url(gateway.redis_url)
    try:
        await client.delete(redis_keys.idempotency_key("sales", "pos", "c-1"))
    finally:
        await client.aclose()
    again = await chunk(gateway, sid, sales("r", 2), **{"Idempotency-Key": "c-1"})
    assert again.status == 201 and "Idempotent-Replayed" not in again.headers
    assert [e for e, _ in await published_events(gateway)] == sales("r", 2) * 2
    other = await chunk(gateway, sid, sales("s", 1), **{"Idempotency-Key": "c-2"})
    assert other.status == 201
    got = counts(await status(gateway, sid))
    assert (got["chunks"], got["items_received"], got["items_accepted"]) == (2, 3, 3)


async def test_create_accepts_namespace_and_entity_and_checks_its_fields(make_gateway):
    gw = await make_gateway(SLUICE_SESSION_MAX_TIMEOUT_S="3600")
    doc = await open_session(gw, namespace="finance", entity="sales", timeout_s=60)
    assert (doc["dataset"], doc["namespace"], doc["timeout_s"]) == ("sales", "finance", 60)
    headers = {**auth(gw.key), "Content-Type": "application/json"}
    for body in ({}, {"dataset": "sales", "colour": "red"}, {"dataset": "sales", "entity": "x"},
                 {"dataset": "sales", "timeout_s": 0}, {"dataset": "sales", "timeout_s": 3601},
                 {"dataset": "sales", "timeout_s": "60"}, {"dataset": 5}, ["sales"]):
        resp = await gw.client.post("/v1/ingestions", data=orjson.dumps(body), headers=headers)
        await assert_problem(resp, 400, "INVALID_PARAMETER")
    resp = await gw.client.post("/v1/ingestions", data=b"{", headers=headers)
    await assert_problem(resp, 400, "MALFORMED_JSON")
    resp = await gw.client.post("/v1/ingestions", data=b'{"dataset": "nope"}', headers=headers)
    await assert_problem(resp, 404, "DATASET_NOT_FOUND")
    resp = await gw.client.post("/v1/ingestions", data=b'{"dataset": "other"}', headers=headers)
    await assert_problem(resp, 403, "FORBIDDEN")
    # a create retried with its Idempotency-Key answers the same session
    retried = [await gw.client.post("/v1/ingestions", data=b'{"dataset": "sales"}',
                                    headers={**headers, "Idempotency-Key": "open-1"})
               for _ in range(2)]
    ids = [(await x.json())["ingestion_id"] for x in retried]
    assert ids[0] == ids[1] and retried[1].headers["Idempotent-Replayed"] == "true"
    assert {x.headers["Location"] for x in retried} == {f"/v1/ingestions/{ids[0]}"}
    # the same key and body on the push route is a reuse, not a replay of the open
    pushed = await gw.post(b'{"dataset": "sales"}', **{"Idempotency-Key": "open-1"})
    await assert_problem(pushed, 422, "IDEMPOTENCY_KEY_REUSED")
    assert await gw.published() == []
    sid = doc["ingestion_id"]
    bad = await gw.client.patch(f"/v1/ingestions/{sid}", data=b'{"status": "pending"}',
                                headers=headers)
    await assert_problem(bad, 400, "INVALID_PARAMETER")
    bad = await gw.client.patch(f"/v1/ingestions/{sid}", data=b'{"status": ', headers=headers)
    await assert_problem(bad, 400, "MALFORMED_JSON")
    assert (await status(gw, sid))["status"] == "pending"


async def test_open_and_close_take_json_gzip_included_and_nothing_else(gateway):
    headers = {**auth(gateway.key), "Content-Type": "application/json"}
    opened = await gateway.client.post("/v1/ingestions", data=gzip.compress(b'{"dataset": '
                                       b'"sales"}'), headers={**headers,
                                                              "Content-Encoding": "gzip"})
    assert opened.status == 201, await opened.text()
    sid = (await opened.json())["ingestion_id"]
    for extra, code in (({"Content-Type": "application/x-ndjson"}, "UNSUPPORTED_MEDIA_TYPE"),
                        ({"Content-Encoding": "br"}, "UNSUPPORTED_CONTENT_ENCODING")):
        refused = await gateway.client.post("/v1/ingestions", data=b'{"dataset": "sales"}',
                                            headers={**headers, **extra})
        await assert_problem(refused, 415, code)
        refused = await gateway.client.patch(f"/v1/ingestions/{sid}", headers={**headers, **extra},
                                             data=b'{"status": "closed"}')
        await assert_problem(refused, 415, code)
    assert (await status(gateway, sid))["status"] == "pending"
    closed = await gateway.client.patch(f"/v1/ingestions/{sid}", headers={
        **headers, "Content-Encoding": "gzip"}, data=gzip.compress(b'{"status": "closed"}'))
    assert closed.status == 200 and (await closed.json())["status"] == "closed"


async def test_404_for_unknown_ids_and_other_keys_sessions(make_gateway):
    gw = await make_gateway(**ADMIN_ENV)
    sid = (await open_session(gw))["ingestion_id"]
    unknown = "ing_" + "0" * 24
    for path in (f"/v1/ingestions/{unknown}", "/v1/ingestions/nonsense",
                 f"/v1/ingestions/{unknown}/stats"):
        await assert_problem(await gw.client.get(path, headers=auth(gw.key)), 404,
                             "SESSION_NOT_FOUND")
    await assert_problem(await chunk(gw, unknown, sales("u", 1)), 404, "SESSION_NOT_FOUND")
    await assert_problem(await close(gw, unknown), 404, "SESSION_NOT_FOUND")
    # a key of another dataset, and another key of the same dataset, see nothing
    other_gw, pos2 = await with_sales_key(gw, "pos2")
    try:
        for key in (gw.other_key, pos2):
            resp = await other_gw.get(f"/v1/ingestions/{sid}", headers=auth(key))
            await assert_problem(resp, 404, "SESSION_NOT_FOUND")
            resp = await other_gw.post(f"/v1/ingestions/{sid}/chunks", data=b'{"region": "z", '
                                       b'"revenue": 1}', headers={
                                           **auth(key), "Content-Type": "application/json"})
            await assert_problem(resp, 404, "SESSION_NOT_FOUND")
            resp = await other_gw.patch(f"/v1/ingestions/{sid}", data=b'{"status": "closed"}',
                                        headers={**auth(key), "Content-Type": "application/json"})
            await assert_problem(resp, 404, "SESSION_NOT_FOUND")
            listed = await (await other_gw.get("/v1/ingestions", headers=auth(key))).json()
            assert listed["total"] == 0 and listed["ingestions"] == []
        own = await other_gw.get(f"/v1/ingestions/{sid}", headers=auth(gw.key))
        assert own.status == 200
    finally:
        await other_gw.close()
    assert (await status(gw, sid, key=ADMIN))["status"] == "pending"  # admins see all
    assert (await close(gw, sid, key=ADMIN)).status == 200
    assert (await status(gw, sid))["status"] == "closed"
    assert await gw.published() == []


async def test_list_filters_and_pages(make_gateway):
    gw = await make_gateway(**ADMIN_ENV)
    ids = [(await open_session(gw))["ingestion_id"] for _ in range(4)]  # oldest first
    short = (await open_session(gw, dataset="sales", timeout_s=1))["ingestion_id"]
    crm = (await open_session(gw, key=gw.other_key, dataset="other"))["ingestion_id"]
    assert (await close(gw, ids[1])).status == 200
    await asyncio.sleep(1.3)  # `short` expires

    async def listing(query: str = "", key: str | None = None) -> dict:
        resp = await gw.client.get(f"/v1/ingestions{query}", headers=auth(key or gw.key))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    def listed(doc: dict) -> list[str]:
        return [s["ingestion_id"] for s in doc["ingestions"]]

    everything = await listing()
    assert listed(everything) == [short, *reversed(ids)] and everything["total"] == 5
    assert listed(await listing("?status=closed")) == [ids[1]]
    assert listed(await listing("?status=expired")) == [short]
    pending = await listing("?status=pending&from=1&size=2")
    assert listed(pending) == [ids[2], ids[0]] and pending["total"] == 3
    assert pending["truncated"] is False
    page = await listing("?from=1&size=2")
    assert listed(page) == [ids[3], ids[2]] and (page["from"], page["size"]) == (1, 2)
    assert listed(await listing("?dataset=sales&size=1")) == [short]
    assert listed(await listing(key=gw.other_key)) == [crm]
    admin = await listing(key=ADMIN)
    assert set(listed(admin)) == {*ids, short, crm} and admin["total"] == 6
    assert listed(await listing("?dataset=other", key=ADMIN)) == [crm]
    for query, status_code, code in (("?status=open", 400, "INVALID_PARAMETER"),
                                     ("?size=0", 400, "INVALID_PARAMETER"),
                                     # found by the API fuzz test: Redis refused it, as a 503
                                     (f"?from={2**91}", 400, "INVALID_PARAMETER"),
                                     ("?dataset=other", 403, "FORBIDDEN"),
                                     ("?dataset=nope", 404, "DATASET_NOT_FOUND")):
        resp = await gw.client.get(f"/v1/ingestions{query}", headers=auth(gw.key))
        await assert_problem(resp, status_code, code)


async def test_statistics_windows_equal_exact_counts(gateway, tmp_path):
    storage = f"sqlite:///{tmp_path}/stats.db"
    assert (await gateway.post(orjson.dumps(sales("push", 3)))).status == 202
    assert (await gateway.post(orjson.dumps([{"revenue": 1}]))).status == 400
    sid = (await open_session(gateway))["ingestion_id"]
    assert (await chunk(gateway, sid, sales("s1", 4))).status == 201
    mixed = [*sales("s2", 2), {"region": "bad", "revenue": -1}]
    assert (await chunk(gateway, sid, mixed, **{"Idempotency-Key": "m"})).status == 201
    assert (await chunk(gateway, sid, mixed, **{"Idempotency-Key": "m"})).status == 201  # replay
    assert (await close(gateway, sid)).status == 200
    await assert_problem(await chunk(gateway, sid, sales("s3", 1)), 409, "SESSION_CLOSED")
    async with Running(gateway, storage):
        await wait_for(lambda: _complete(gateway, sid))
        await wait_for(lambda: _equals_count(storage, 9))
        await asyncio.sleep(0.3)  # the gateway's outcomes flush every 0.2 s

    mine = await session_stats(gateway, sid)
    # a replay and a refused chunk are requests, but receive nothing new
    expected = {"requests": 4, "received": 4 + 3, "accepted": 6, "rejected": 1,
                "replayed": 1, "rate_limited": 0, "written": 6, "duplicates": 0, "failed": 0}
    assert {k: mine["totals"][k] for k in expected} == expected
    for window in ("minute", "hour", "day"):
        assert mine["windows"][window] == {k: mine["totals"][k] for k in COUNTED}, window
    final = await status(gateway, sid)
    assert (final["items_accepted"], final["items_written"]) == (6, 6)

    resp = await gateway.client.get("/v1/datasets/sales/stats", headers=auth(gateway.key))
    dataset = await resp.json()
    totals = dataset["totals"]
    expected = {"requests": 6, "received": 3 + 1 + 7, "accepted": 3 + 6, "rejected": 1 + 1,
                "replayed": 1, "written": 9, "failed": 0}
    assert {k: totals[k] for k in expected} == expected
    for window in ("minute", "hour", "day"):
        assert dataset["windows"][window] == {k: totals[k] for k in COUNTED}, window


async def _equals_count(storage: str, expected: int) -> bool:
    return await count(storage) == expected


class ScriptFaults:
    """A TCP proxy in front of Redis that upsets the calls of one Lua script (by its SHA-1),
    as a network does: ``break_answer`` lets the next call reach Redis, then closes the
    connection instead of passing on the answer (the client retries the call on a new
    connection: the script runs twice); ``swallow`` drops every call for a while without an
    answer (the client times out; Redis never ran it). Everything else passes unchanged."""

    def __init__(self, redis_url: str, script: str):
        target = urllib.parse.urlparse(redis_url)
        self._target = (target.hostname, target.port)
        self._db = target.path
        self._sha = hashlib.sha1(script.encode()).hexdigest().encode()
        self._break = 0
        self._swallow_until = 0.0
        self.broken = self.swallowed = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}{self._db}"

    async def close(self) -> None:
        self._server.close()

    def break_answer(self, times: int = 1) -> None:
        self._break = times

    def swallow(self, seconds: float) -> None:
        self._swallow_until = time.monotonic() + seconds

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        watched = asyncio.Event()  # a call of the script went up this connection

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self._sha in data:
                    if time.monotonic() < self._swallow_until:
                        self.swallowed += 1
                        continue
                    watched.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if watched.is_set():
                    watched.clear()
                    if self._break and data[:1] == b":":  # the script ran (an integer answer)
                        self._break -= 1
                        self.broken += 1
                        return
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.wait([asyncio.create_task(upstream()),
                                asyncio.create_task(downstream())],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (writer, up_writer):
                w.close()


@pytest.fixture
async def end_faults(redis_url):
    faults = ScriptFaults(redis_url, sessions_module._END)
    url = await faults.start()
    yield faults, url
    await faults.close()


async def test_a_chunk_end_run_twice_counts_the_chunk_once(redis_url):
    """The chunk-end script run twice for one chunk (the Redis client retries a call whose
    connection broke, possibly after Redis ran it) counts the chunk once; a chunk with an
    Idempotency-Key is counted once per key as before."""
    settings = Settings.from_env({"REDIS_URL": redis_url, "KAFKA_ENABLE_IDEMPOTENCE": "false"})
    client = Redis.from_url(redis_url)
    try:
        store = Sessions(client, settings)
        pos = Principal("pos", frozenset({"sales"}))
        session = await store.create("sales", CreateSpec("sales", None, 60), "pos")
        for idempotency_key, counts in ((None, (3, 2, 1)), ("c-1", (4, 4, 0))):
            claim = await store.enter(session.id, "pos", idempotency_key)
            await store.leave(claim, counts)
            await store.leave(claim, counts)  # the retried call
        await store.close(session.id, pos)
        after = await store.get(session.id, pos)
        assert (after.chunks, after.received, after.accepted, after.rejected, after.in_flight) \
            == (2, 7, 6, 1, 0)
        assert await client.zcard(redis_keys.session_inflight_key(session.id)) == 0
    finally:
        await client.aclose()


async def test_a_chunk_end_retried_after_a_broken_connection_is_counted_once(
        make_gateway, end_faults, tmp_path):
    """End to end: the connection breaks after Redis ran the chunk-end script and before its
    answer arrived; the client's retry must not count the chunk again (it did: accepted 4 of
    2 records, and the session never became complete)."""
    faults, url = end_faults
    gw = await make_gateway(redis=url)
    sid = (await open_session(gw))["ingestion_id"]
    faults.break_answer()
    resp = await chunk(gw, sid, sales("once", 2))
    assert resp.status == 201 and (await resp.json())["items_accepted"] == 2
    assert faults.broken == 1
    closed = await (await close(gw, sid)).json()
    assert counts(closed) == {"chunks": 1, "chunks_in_flight": 0, "items_received": 2,
                              "items_accepted": 2, "items_rejected": 0, "items_written": 0,
                              "items_failed": 0}
    assert [e for e, _ in await published_events(gw)] == sales("once", 2)
    storage = f"sqlite:///{tmp_path}/once.db"
    async with Running(gw, storage):
        await wait_for(lambda: _complete(gw, sid))
    final = await status(gw, sid)
    assert (final["items_written"], final["items_pending"]) == (2, 0)
    assert await count(storage) == 2


async def test_a_chunk_end_redis_did_not_take_is_counted_later_and_holds_completion(
        make_gateway, end_faults, tmp_path):
    """The chunk was published and answered 201, but its end (claim dropped, counts added)
    timed out. It is tried again in the background until Redis takes it; meanwhile the chunk
    is in flight and the closed session is not complete. (The end was dropped: the chunk was
    never counted, and once its claim lapsed the session was complete before the workers
    wrote anything.)"""
    faults, url = end_faults
    gw = await make_gateway(redis=url)
    sid = (await open_session(gw))["ingestion_id"]
    faults.swallow(1.5)  # each call times out (REDIS_TIMEOUT_S 0.5); Redis never runs it
    resp = await chunk(gw, sid, sales("late", 2))
    assert resp.status == 201 and (await resp.json())["items_accepted"] == 2
    closed = await (await close(gw, sid)).json()
    assert closed["status"] == "closed" and closed["complete"] is False
    assert (closed["chunks_in_flight"], closed["chunks"], closed["items_accepted"]) == (1, 0, 0)
    assert [e for e, _ in await published_events(gw)] == sales("late", 2)
    await wait_for(lambda: _accepted(gw, sid, 2), timeout=10)
    assert faults.swallowed >= 2  # the first call and at least one retry
    counted = await status(gw, sid)
    assert counts(counted) == {"chunks": 1, "chunks_in_flight": 0, "items_received": 2,
                               "items_accepted": 2, "items_rejected": 0, "items_written": 0,
                               "items_failed": 0}
    assert counted["chunks_lapsed"] == 0 and counted["complete"] is False
    storage = f"sqlite:///{tmp_path}/late.db"
    async with Running(gw, storage):
        await wait_for(lambda: _complete(gw, sid))
    assert (await status(gw, sid))["items_written"] == 2 and await count(storage) == 2
    assert len(gw.client.app[SESSIONS].deferred) == 0


async def _accepted(gw, sid: str, expected: int) -> bool:
    return (await status(gw, sid))["items_accepted"] == expected


async def test_a_claim_that_lapsed_keeps_the_session_from_completing(gateway, tmp_path):
    """Gateways that died mid-chunk leave claims that lapse: the chunk's records may be
    published and not counted, so the session shows them (chunks_lapsed) and is not complete
    (it was: nothing in flight, nothing accepted). The retry of such a chunk with its
    Idempotency-Key counts it and settles the lapsed claim; one without a key stays."""
    client = Redis.from_url(gateway.redis_url)
    # what a dead gateway with 1 s claims left behind: chunks entered and never ended
    dead = Sessions(client, Settings.from_env({
        "SLUICE_IDEMPOTENCY_LOCK_TTL_S": "1", "KAFKA_PUBLISH_TIMEOUT_S": "0.5"}))
    try:
        first, second = (await open_session(gateway))["ingestion_id"], \
            (await open_session(gateway))["ingestion_id"]
        for sid in (first, second):
            await dead.enter(sid, "pos", None)
            await dead.enter(sid, "pos", "c-1")
        assert (await status(gateway, first))["chunks_in_flight"] == 2
        await asyncio.sleep(1.1)
    finally:
        await client.aclose()
    closed = await (await close(gateway, first)).json()
    assert (closed["chunks_in_flight"], closed["chunks_lapsed"]) == (0, 2)
    assert closed["items_pending"] == 0 and closed["complete"] is False

    retried = await chunk(gateway, second, sales("again", 2), **{"Idempotency-Key": "c-1"})
    assert retried.status == 201
    doc = await (await close(gateway, second)).json()
    assert (doc["chunks_lapsed"], doc["chunks"], doc["items_accepted"]) == (1, 1, 2)
    storage = f"sqlite:///{tmp_path}/lapsed.db"
    async with Running(gateway, storage):
        await wait_for(lambda: _written(gateway, second, 2))
    final = await status(gateway, second)
    assert final["items_pending"] == 0 and final["complete"] is False  # the keyless one
    assert [e for e, _ in await published_events(gateway)] == sales("again", 2)
