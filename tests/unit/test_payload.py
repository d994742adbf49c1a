"""Body handling: limits, gzip inflation, JSON and NDJSON parsing."""

import asyncio
import gzip

import orjson
import pytest

from gateway.budget import BodyBudget, Hold
from gateway.errors import (
    DecompressedTooLarge,
    EmptyPayload,
    InvalidPayload,
    MalformedJson,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    UnsupportedEncoding,
    UnsupportedMediaType,
)
from gateway.payload import (
    _Inflation,
    check_declared_length,
    check_encoding,
    gunzip,
    media_type,
    parse_items,
    read_limited,
)
from tests.unit.test_budget import partly_held


class Chunks:
    """A body whose chunks are all here, or that waits ``stall`` seconds before each."""

    def __init__(self, *chunks: bytes, stall: float = 0.0):
        self.chunks = list(chunks)
        self.stall = stall

    def is_eof(self) -> bool:
        return not self.stall

    async def readany(self) -> bytes:
        await asyncio.sleep(self.stall)
        return self.chunks.pop(0) if self.chunks else b""


def test_media_types():
    assert media_type("application/json", None) == "application/json"
    assert media_type("application/x-ndjson", "utf-8") == "application/x-ndjson"
    for bad in (None, "text/plain", "application/xml"):
        with pytest.raises(UnsupportedMediaType):
            media_type(bad, None)
    with pytest.raises(UnsupportedMediaType):
        media_type("application/json", "latin-1")


def test_encodings():
    assert check_encoding(None) is False
    assert check_encoding("identity") is False
    assert check_encoding("gzip") is True
    with pytest.raises(UnsupportedEncoding):
        check_encoding("br")


def test_declared_length_over_limit_is_refused_before_reading():
    check_declared_length(None, 10)
    check_declared_length(10, 10)
    with pytest.raises(PayloadTooLarge):
        check_declared_length(11, 10)


def roomy() -> Hold:
    return BodyBudget(1 << 30).hold("sales")


async def test_read_limited_stops_as_soon_as_the_limit_is_passed():
    assert await read_limited(Chunks(b"abc", b"de"), 5, 1.0, roomy()) == b"abcde"
    stream = Chunks(b"abc", b"def", b"never read")
    with pytest.raises(PayloadTooLarge):
        await read_limited(stream, 5, 1.0, roomy())
    assert stream.chunks == [b"never read"]


async def test_read_limited_gives_a_body_still_arriving_its_time_and_no_more():
    assert await read_limited(Chunks(b"abc", b"de", stall=0.01), 5, 1.0, roomy()) == b"abcde"
    stream = Chunks(b"abc", b"de", b"f", stall=0.2)
    with pytest.raises(RequestTimeout, match=r"did not arrive within 0\.3 s"):
        await read_limited(stream, 100, 0.3, roomy())
    assert stream.chunks == [b"de", b"f"]  # the second read was cut short


async def test_read_limited_holds_each_piece_before_keeping_it():
    budget, _ = partly_held(10, 4, wait_s=0.05)
    hold = budget.hold("sales")
    assert await read_limited(Chunks(b"abc", b"de"), 100, 1.0, hold) == b"abcde"
    assert hold.held == 5 and budget.in_use == 9
    hold.release()
    stream = Chunks(b"abc", b"defg", b"never read")  # 7 bytes do not fit beside the 4
    with pytest.raises(ServerBusy):
        await read_limited(stream, 100, 1.0, hold)
    assert stream.chunks == [b"never read"]
    assert hold.held == 3 and budget.waiting == 0  # what it held until refused, until released
    hold.release()
    assert budget.in_use == 4


async def test_read_limited_lets_a_piece_wait_for_room():
    budget, other = partly_held(10, 8)
    hold = budget.hold("sales")
    reading = asyncio.create_task(read_limited(Chunks(b"ab", b"cd"), 100, 1.0, hold))
    await asyncio.sleep(0.01)
    assert not reading.done() and hold.held == 2 and budget.waiting == 1
    other.release()
    assert await reading == b"abcd" and hold.held == budget.in_use == 4


async def test_gunzip_bounds_inflation():
    data = b'{"a": 1}' * 1000
    assert await gunzip(gzip.compress(data), len(data), roomy()) == data
    with pytest.raises(DecompressedTooLarge):
        await gunzip(gzip.compress(data), len(data) - 1, roomy())
    bomb = gzip.compress(b"\0" * 50_000_000)
    with pytest.raises(DecompressedTooLarge):
        await gunzip(bomb, 1_000_000, roomy())


async def test_gunzip_multi_member_and_corrupt():
    two = gzip.compress(b"[1,") + gzip.compress(b"2]")
    assert await gunzip(two, 100, roomy()) == b"[1,2]"
    assert await gunzip(b"", 100, roomy()) == b""
    with pytest.raises(InvalidPayload):
        await gunzip(b"not gzip at all", 100, roomy())
    with pytest.raises(InvalidPayload, match="truncated"):
        await gunzip(gzip.compress(b"x" * 100)[:-10], 1000, roomy())
    with pytest.raises(InvalidPayload):
        await gunzip(gzip.compress(b"[1]") + b"trailing", 1000, roomy())


@pytest.mark.parametrize("room", [1, 7, 300, 4096])
async def test_gunzip_inflates_piece_by_piece_within_its_room(room):
    """However little room each piece gets, the body comes out whole, and the hold never
    covers less than what is inflated."""
    data = orjson.dumps([{"region": f"r{i}", "revenue": i} for i in range(2000)])
    packed = gzip.compress(data[:20_000]) + gzip.compress(data[20_000:])
    seen = []
    inflation = _Inflation(packed, len(data))
    while not inflation.done:
        inflation.inflate(room)
        seen.append(inflation.size)
    assert inflation.body() == data
    assert all(b - a <= room for a, b in zip([0, *seen], seen, strict=False))
    with pytest.raises(InvalidPayload, match="truncated"):
        inflation = _Inflation(packed[:-10], len(data))
        while not inflation.done:
            inflation.inflate(room)


async def test_gunzip_holds_the_inflated_bytes_and_waits_for_room_it_lacks():
    data = b'{"a": 1}' * 1000  # 8000 bytes, about 60 gzipped
    packed = gzip.compress(data)
    budget = BodyBudget(10_000, wait_s=5)
    hold = budget.hold("sales")
    assert hold.try_cover(len(packed))
    assert await gunzip(packed, 50_000, hold) == data  # room enough: no wait
    assert hold.held == budget.in_use == len(packed) + len(data)
    hold.release()
    other = budget.hold("sales")
    assert other.try_cover(7_000)  # 3,000 left: not enough for 8,000
    assert hold.try_cover(len(packed))
    inflating = asyncio.create_task(gunzip(packed, 50_000, hold))
    await asyncio.sleep(0.01)
    assert not inflating.done() and budget.waiting == 1
    assert hold.held == budget.capacity - other.held  # inflated into all the room there was
    other.release()
    assert await inflating == data
    assert hold.held == budget.in_use == len(packed) + len(data)


async def test_gunzip_with_no_room_in_time_is_refused_and_keeps_what_it_held():
    packed = gzip.compress(b'{"a": 1}' * 1000)
    budget, _ = partly_held(10_000, 7_000, wait_s=0.05)
    hold = budget.hold("sales")
    assert hold.try_cover(len(packed))
    with pytest.raises(ServerBusy):
        await gunzip(packed, 50_000, hold)
    assert budget.in_use == budget.capacity and budget.waiting == 0
    hold.release()
    assert budget.in_use == 7_000


def test_parse_json_shapes():
    assert parse_items(b'{"a":1}', "application/json") == [{"a": 1}]
    assert parse_items(b'[{"a":1},{"a":2}]', "application/json") == [{"a": 1}, {"a": 2}]
    with pytest.raises(EmptyPayload):
        parse_items(b"[]", "application/json")
    with pytest.raises(InvalidPayload):
        parse_items(b"42", "application/json")


def test_malformed_json_reports_the_position():
    with pytest.raises(MalformedJson) as info:
        parse_items(b'[{"a":1},\n {"a":}]', "application/json")
    assert info.value.extra["line"] == 2
    assert info.value.extra["column"] > 1


def test_ndjson_lines_and_errors():
    body = b'{"a":1}\n\n{"a":2}\r\n'
    assert parse_items(body, "application/x-ndjson") == [{"a": 1}, {"a": 2}]
    with pytest.raises(MalformedJson) as info:
        parse_items(b'{"a":1}\n{"a":\n', "application/x-ndjson")
    assert info.value.extra["line"] == 2
    with pytest.raises(EmptyPayload):
        parse_items(b"\n\n", "application/x-ndjson")


class Stalls:
    """A body whose first piece is here and whose rest never comes."""

    def __init__(self, first: bytes):
        self.first = first

    def is_eof(self) -> bool:
        return False

    async def readany(self) -> bytes:
        first, self.first = self.first, b""
        if not first:
            await asyncio.sleep(60)
        return first


async def test_a_read_cancelled_midway_gives_its_hold_back():
    budget = BodyBudget(100)

    async def route() -> None:
        with budget.hold("sales") as hold:
            await read_limited(Stalls(b"abc"), 100, 60, hold)

    task = asyncio.create_task(route())
    for _ in range(100):
        if budget.in_use:
            break
        await asyncio.sleep(0.01)
    assert budget.in_use == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.in_use == 0
