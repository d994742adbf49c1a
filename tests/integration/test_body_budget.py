"""The body budget covers a body from its first byte: bodies still arriving (declared or
chunked) hold their bytes, and give them back however the request ends. Real gateway, Redis
and broker; the budget is the sales dataset's largest body (test_push.BUDGET_ENV). A gzip
body's inflated bytes: test_faults (the 503 SERVER_BUSY test)."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from redis.asyncio import Redis

from schemas.redis_keys import idempotency_key
from tests.integration.test_push import (
    BUDGET,
    BUDGET_ENV,
    ITEMS,
    assert_problem,
    body_budget,
    events,
    sales_items,
)
from tests.integration.test_sessions import chunk, close, open_session

pytestmark = pytest.mark.integration


async def until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def arriving(body: bytes, first: int, go: asyncio.Event | None = None
                   ) -> AsyncIterator[bytes]:
    """A chunked body (no Content-Length): ``first`` bytes at once, the rest once ``go``."""
    yield body[:first]
    if go is not None:
        await go.wait()
    if body[first:]:
        yield body[first:]


async def partial(gw, path: str, declared: int, sent: bytes = b"[{", **headers: str):
    """A connection that sent a request's headers, declaring ``declared`` body bytes, and
    only ``sent`` of them."""
    reader, writer = await asyncio.open_connection(gw.client.host, gw.client.port)
    lines = {"Host": "sluice", "Authorization": f"Bearer {gw.key}",
             "Content-Type": "application/json", "Content-Length": str(declared), **headers}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    writer.write(head.encode() + b"\r\n" + sent)
    await writer.drain()
    return reader, writer


async def status_of(reader: asyncio.StreamReader) -> int:
    return int((await asyncio.wait_for(reader.readline(), 10)).split()[1])


async def claimed(gw, token: str) -> bool:
    redis = Redis.from_url(gw.redis_url)
    try:
        return bool(await redis.exists(idempotency_key("sales", "pos", token)))
    finally:
        await redis.aclose()


def by_region(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda item: item["region"])


async def test_chunked_uploads_hold_the_budget_as_they_arrive_and_the_one_past_it_gets_503(
        make_gateway):
    gw = await make_gateway(**BUDGET_ENV)
    budget = body_budget(gw)
    go = asyncio.Event()
    bodies = [sales_items(62_000, f"up{i}") for i in range(4)]
    uploads = [asyncio.create_task(gw.post(arriving(orjson.dumps(items), 60_000, go),
                                           **{"Idempotency-Key": f"up{i}"}))
               for i, items in enumerate(bodies)]
    await until(lambda: budget.in_use == 4 * 60_000, "the 4 uploads hold what arrived")
    extra = sales_items(30_000, "extra")  # 22,144 bytes are left
    busy = await gw.post(arriving(orjson.dumps(extra), 30_000), **{"Idempotency-Key": "extra"})
    doc = await assert_problem(busy, 503, "SERVER_BUSY")
    assert busy.headers["Retry-After"] == "1" and "Nothing was accepted" in doc["detail"]
    assert budget.in_use == 4 * 60_000 and budget.waiting == 0
    assert not any(upload.done() for upload in uploads)
    assert not await claimed(gw, "extra")  # refused before admission
    go.set()
    for upload in uploads:
        assert (await upload).status == 202
    assert budget.in_use == 0
    retry = await gw.post(arriving(orjson.dumps(extra), 10_000), **{"Idempotency-Key": "extra"})
    assert retry.status == 202 and "Idempotent-Replayed" not in retry.headers
    assert budget.in_use == 0
    published = events(await gw.published())
    assert by_region(published) == by_region([*extra, *(i for b in bodies for i in b)])


async def test_a_declared_length_is_held_before_the_body_is_read(make_gateway):
    gw = await make_gateway(**BUDGET_ENV)
    budget = body_budget(gw)
    path = "/v1/datasets/sales/events"
    waiting = [await partial(gw, path, 63_000) for _ in range(4)]  # 2 bytes sent of each
    await until(lambda: budget.in_use == 4 * 63_000, "the declared lengths are held")
    late = orjson.dumps(sales_items(20_000, "late"))  # 10,144 bytes are left
    busy = await gw.post(late, **{"Idempotency-Key": "late"})
    await assert_problem(busy, 503, "SERVER_BUSY")
    assert not await claimed(gw, "late")
    # a client that asks to continue is refused before it sends its body
    reader, writer = await partial(gw, path, len(late), b"", Expect="100-continue")
    assert await status_of(reader) == 503
    writer.close()
    assert budget.in_use == 4 * 63_000 and budget.waiting == 0
    for _, writer in waiting:  # clients that leave (499) give their bytes back
        writer.close()
    await until(lambda: budget.in_use == 0, "the leavers' bytes are given back")
    retry = await gw.post(late, **{"Idempotency-Key": "late"})
    assert retry.status == 202 and "Idempotent-Replayed" not in retry.headers
    assert budget.in_use == 0
    assert events(await gw.published()) == orjson.loads(late)


async def test_every_way_a_request_ends_gives_its_bytes_back(make_gateway):
    gw = await make_gateway(SLUICE_BODY_TIMEOUT_S="1", **BUDGET_ENV)
    budget = body_budget(gw)
    path = "/v1/datasets/sales/events"

    async def given_back(resp, status: int, code: str) -> None:
        await assert_problem(resp, status, code)
        assert budget.in_use == 0, code

    # 408: held while it arrived, given back when it stopped arriving
    reader, writer = await partial(gw, path, 50_000)
    await until(lambda: budget.in_use == 50_000, "the declared length is held")
    assert await status_of(reader) == 408
    writer.close()
    assert budget.in_use == 0
    # 499: the client left mid-body
    _, writer = await partial(gw, path, 50_000)
    await until(lambda: budget.in_use == 50_000, "the declared length is held")
    writer.close()
    await until(lambda: budget.in_use == 0, "the leaver's bytes are given back")
    # 413 while a chunked body arrives: held piece by piece up to the limit
    go = asyncio.Event()
    too_big = orjson.dumps(sales_items(80_000, "big"))
    sending = asyncio.create_task(gw.post(arriving(too_big, 40_000, go)))
    await until(lambda: budget.in_use == 40_000, "the chunked body's first piece is held")
    go.set()
    await given_back(await sending, 413, "PAYLOAD_TOO_LARGE")
    # 400 and 413 of gzip bodies, 400 of JSON and of the schema, 422 after admission
    packed = gzip.compress(orjson.dumps(ITEMS))
    await given_back(await gw.post(packed[:-8], **{"Content-Encoding": "gzip"}), 400,
                     "INVALID_PAYLOAD")
    await given_back(await gw.post(gzip.compress(b"[" + b" " * BUDGET + b"]"),
                                   **{"Content-Encoding": "gzip"}), 413,
                     "DECOMPRESSED_TOO_LARGE")
    await given_back(await gw.post(arriving(b'[{"region": "x", ', 5)), 400, "MALFORMED_JSON")
    await given_back(await gw.post(b'[{"region": ""}]'), 400, "VALIDATION_FAILED")
    assert (await gw.post(packed, **{"Idempotency-Key": "k", "Content-Encoding": "gzip"})
            ).status == 202
    assert budget.in_use == 0
    await given_back(await gw.post(orjson.dumps(ITEMS[:1]), **{"Idempotency-Key": "k"}), 422,
                     "IDEMPOTENCY_KEY_REUSED")
    # a session: its open and close bodies, a chunk that stopped arriving, a gzip chunk
    session = (await open_session(gw))["ingestion_id"]
    assert budget.in_use == 0
    reader, writer = await partial(gw, f"/v1/ingestions/{session}/chunks", 40_000)
    await until(lambda: budget.in_use == 40_000, "the chunk's declared length is held")
    assert await status_of(reader) == 408
    writer.close()
    assert budget.in_use == 0
    done = await chunk(gw, session, packed, **{"Content-Encoding": "gzip"})
    assert done.status == 201 and budget.in_use == 0
    assert (await close(gw, session)).status == 200 and budget.in_use == 0
    assert events(await gw.published()) == ITEMS + ITEMS


async def test_a_gzip_body_waits_for_the_room_its_trailer_says_it_needs_not_more(
        make_gateway):
    """A gzip body that does not fit inflates into all the room there is, then waits for
    what its trailer says is left. It waited for as much again as it had inflated (at least
    64 KiB), so room enough for the rest (freed while it waited) went unused and it got 503
    although it fit."""
    gw = await make_gateway(**BUDGET_ENV)
    budget = body_budget(gw)
    path = "/v1/datasets/sales/events"
    holding = [await partial(gw, path, 50_000) for _ in range(4)]  # 2 bytes sent of each
    await until(lambda: budget.in_use == 200_000, "the declared lengths are held")
    items = sales_items(90_000, "gz")
    packed = gzip.compress(orjson.dumps(items))
    # it inflates into the 62,144 bytes left but its compressed body, then needs the rest
    rest = len(orjson.dumps(items)) - (BUDGET - 200_000 - len(packed))
    assert 0 < rest < 50_000 < 65_536
    sending = asyncio.create_task(gw.post(packed, **{"Content-Encoding": "gzip"}))
    await until(lambda: budget.waiting == 1, "the gzip body waits for room")
    holding.pop()[1].close()  # one leaves (499): 50,000 bytes, more than the rest needs
    assert (await sending).status == 202
    for _, writer in holding:
        writer.close()
    await until(lambda: budget.in_use == 0, "every byte is given back")
    assert events(await gw.published()) == items
