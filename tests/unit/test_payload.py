"""Body handling: limits, gzip inflation, JSON and NDJSON parsing."""

import asyncio
import gzip

import pytest

from gateway.errors import (
    DecompressedTooLarge,
    EmptyPayload,
    InvalidPayload,
    MalformedJson,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedEncoding,
    UnsupportedMediaType,
)
from gateway.payload import (
    check_declared_length,
    check_encoding,
    gunzip,
    media_type,
    parse_items,
    read_limited,
)


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


async def test_read_limited_stops_as_soon_as_the_limit_is_passed():
    assert await read_limited(Chunks(b"abc", b"de"), 5, 1.0) == b"abcde"
    stream = Chunks(b"abc", b"def", b"never read")
    with pytest.raises(PayloadTooLarge):
        await read_limited(stream, 5, 1.0)
    assert stream.chunks == [b"never read"]


async def test_read_limited_gives_a_body_still_arriving_its_time_and_no_more():
    assert await read_limited(Chunks(b"abc", b"de", stall=0.01), 5, 1.0) == b"abcde"
    stream = Chunks(b"abc", b"de", b"f", stall=0.2)
    with pytest.raises(RequestTimeout, match=r"did not arrive within 0\.3 s"):
        await read_limited(stream, 100, 0.3)
    assert stream.chunks == [b"de", b"f"]  # the second read was cut short


def test_gunzip_bounds_inflation():
    data = b'{"a": 1}' * 1000
    assert gunzip(gzip.compress(data), len(data)) == data
    with pytest.raises(DecompressedTooLarge):
        gunzip(gzip.compress(data), len(data) - 1)
    bomb = gzip.compress(b"\0" * 50_000_000)
    with pytest.raises(DecompressedTooLarge):
        gunzip(bomb, 1_000_000)


def test_gunzip_multi_member_and_corrupt():
    assert gunzip(gzip.compress(b"[1,") + gzip.compress(b"2]"), 100) == b"[1,2]"
    with pytest.raises(InvalidPayload):
        gunzip(b"not gzip at all", 100)
    with pytest.raises(InvalidPayload):
        gunzip(gzip.compress(b"x" * 100)[:-10], 1000)


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
