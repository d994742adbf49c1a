"""Request bodies: bounded reading and gzip inflation, held in the body budget as they grow;
JSON and NDJSON parsing."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, Protocol

import orjson
from aiohttp.web_protocol import RequestPayloadError

from gateway.budget import Hold
from gateway.errors import (
    ClientClosedRequest,
    DecompressedTooLarge,
    EmptyPayload,
    InvalidPayload,
    MalformedJson,
    MalformedRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedEncoding,
    UnsupportedMediaType,
)

JSON = "application/json"
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_WAIT_STEP = 64 * 1024  # the least room a gzip body waits for once its trailer lied


class Stream(Protocol):
    def is_eof(self) -> bool: ...

    async def readany(self) -> bytes: ...


def media_type(content_type: str | None, charset: str | None) -> str:
    """The accepted media type for a Content-Type, or UnsupportedMediaType."""
    mime = (content_type or "").lower()
    if mime != JSON and mime not in NDJSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type {content_type or '(none)'!r} is not accepted; "
                                   "send application/json or application/x-ndjson")
    if charset and charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset!r} is not accepted; send UTF-8")
    return mime


def check_encoding(content_encoding: str | None) -> bool:
    """True when the body is gzip-compressed; other encodings are refused."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return False
    if encoding in ("gzip", "x-gzip"):
        return True
    raise UnsupportedEncoding(f"Content-Encoding {content_encoding!r} is not accepted")


def check_declared_length(content_length: int | None, limit: int) -> None:
    """Refuse before reading when the declared length is already over the limit."""
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(f"Content-Length {content_length} exceeds the limit of {limit} bytes",
                              limit=limit)


async def read_limited(stream: Stream, limit: int, timeout_s: float, hold: Hold) -> bytes:
    """Read the whole body, each piece held in ``hold`` before it is kept (no wait when the
    hold covers it already, as a declared length does, or there is room; else 503
    SERVER_BUSY when no room came in time), stopping with 413 as soon as it passes
    ``limit`` bytes, and with 408 when it has not all arrived ``timeout_s`` seconds after
    its headers did (a stalled or vanished client would otherwise hold the request, and its
    buffer, for good); 499 when the client closed the connection first, 400 when the body's
    framing breaks."""
    try:
        if stream.is_eof():  # all of it has arrived already (most requests): nothing to wait
            return await _read(stream, limit, hold)
        async with asyncio.timeout(timeout_s):
            return await _read(stream, limit, hold)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s "
                             "of its headers") from None
    except ConnectionResetError:  # aiohttp's "Connection lost"; else a 500 and its traceback
        raise ClientClosedRequest("the connection closed before the whole body arrived, "
                                  "nothing was accepted") from None
    except RequestPayloadError:  # its message may quote the body: not repeated
        raise MalformedRequest("the body's framing (chunked encoding or length) is broken, "
                               "nothing was accepted") from None


async def _read(stream: Stream, limit: int, hold: Hold) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
        if size > hold.held and not hold.try_cover(size):  # a declared length covers it
            await hold.cover(size)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def gunzip(data: bytes, limit: int, hold: Hold) -> bytes:
    """Inflate a gzip body (all members) without ever holding more than ``limit`` + 1 bytes,
    nor more than ``hold`` covers. Each piece is inflated into room taken first: all the
    room the budget has at that moment (most bodies fit in it, so they never wait), else
    room waited for (503 SERVER_BUSY when none came in time). The hold ends with the
    compressed and the inflated bytes, which the request keeps until its answer is built."""
    inflation = _Inflation(data, limit)
    base = hold.held  # the compressed body
    while not inflation.done:
        used = base + inflation.size
        room = min(hold.spare(used), inflation.left)
        if room <= 0:
            await hold.cover(used + inflation.wanted())
            continue
        hold.try_cover(used + room)  # there is room: taken at once
        inflation.inflate(room)
    hold.fit(base + inflation.size)
    return inflation.body()


class _Inflation:
    """A gzip body inflated piece by piece, every member, refused past ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int):
        self._data = data  # what zlib has not taken yet
        self._inflater: Any = None  # the member being inflated
        self._limit = limit
        self._out: list[bytes] = []
        self.size = 0
        self.done = not data
        # The last member's inflated size (mod 2**32) as its trailer says: how much room to
        # wait for when the body does not fit, never how much to inflate (it may lie).
        self._trailer = int.from_bytes(data[-4:], "little") if len(data) >= 18 else 0

    @property
    def left(self) -> int:
        """How much more may be inflated: one byte past the limit is how a bomb shows."""
        return self._limit + 1 - self.size

    def wanted(self) -> int:
        """Room to wait for, no more than ``left``: what the trailer says is left and one
        byte (for the end, or the byte that shows a bomb), so that room enough for the rest
        is taken as soon as it is free; once the trailer is shown wrong (as much is inflated
        already: it lied, or the body has several members), as much again as there is, or
        64 KiB, whichever is more."""
        told = self._trailer - self.size
        return min(self.left, told + 1 if told >= 0 else max(self.size, _WAIT_STEP))

    def inflate(self, most: int) -> None:
        """Inflate up to ``most`` more bytes (fewer when the body ends first)."""
        while most > 0 and not self.done:
            if self._inflater is None:
                self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            inflater = self._inflater
            try:
                chunk = inflater.decompress(self._data, most)
            except zlib.error as exc:
                raise InvalidPayload(f"the gzip body cannot be decompressed: {exc}") from None
            self.size += len(chunk)
            most -= len(chunk)
            if self.size > self._limit:
                raise DecompressedTooLarge(f"the body exceeds {self._limit} bytes once "
                                           "decompressed", limit=self._limit)
            self._out.append(chunk)
            if inflater.eof:  # the member ended; another may follow
                self._data = inflater.unused_data
                self._inflater = None
                self.done = not self._data
            else:
                self._data = inflater.unconsumed_tail
                if most > 0:  # it stopped short of its room without an end: input ran out
                    raise InvalidPayload("the gzip body is truncated")

    def body(self) -> bytes:
        return self._out[0] if len(self._out) == 1 else b"".join(self._out)


def parse_items(body: bytes, mime: str) -> list[Any]:
    """Items of a body: one JSON object, a JSON array, or one JSON value per NDJSON line."""
    items = _parse_ndjson(body) if mime in NDJSON_TYPES else _parse_json(body)
    if not items:
        raise EmptyPayload("the request contains no items")
    return items


def _parse_json(body: bytes) -> list[Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"{exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})",
                            line=exc.lineno, column=exc.colno, position=exc.pos) from None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise InvalidPayload("the body must be a JSON object or an array of objects")


def _parse_ndjson(body: bytes) -> list[Any]:
    items = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise MalformedJson(f"{exc.msg} at line {number} column {exc.colno}",
                                line=number, column=exc.colno) from None
    return items
