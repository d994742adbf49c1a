"""Request bodies: bounded reading, bounded gzip inflation, JSON and NDJSON parsing."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, Protocol

import orjson
from aiohttp.web_protocol import RequestPayloadError

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


async def read_limited(stream: Stream, limit: int, timeout_s: float) -> bytes:
    """Read the whole body, stopping with 413 as soon as it passes ``limit`` bytes, and with
    408 when it has not all arrived ``timeout_s`` seconds after its headers did (a stalled
    or vanished client would otherwise hold the request, and its buffer, for good); 499 when
    the client closed the connection first, 400 when the body's framing breaks."""
    try:
        if stream.is_eof():  # all of it has arrived already (most requests): nothing to wait
            return await _read(stream, limit)
        async with asyncio.timeout(timeout_s):
            return await _read(stream, limit)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s "
                             "of its headers") from None
    except ConnectionResetError:  # aiohttp's "Connection lost"; else a 500 and its traceback
        raise ClientClosedRequest("the connection closed before the whole body arrived, "
                                  "nothing was accepted") from None
    except RequestPayloadError:  # its message may quote the body: not repeated
        raise MalformedRequest("the body's framing (chunked encoding or length) is broken, "
                               "nothing was accepted") from None


async def _read(stream: Stream, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def gunzip(data: bytes, limit: int) -> bytes:
    """Inflate a gzip body (all members) without ever holding more than ``limit`` + 1 bytes."""
    out: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidPayload(f"the gzip body cannot be decompressed: {exc}") from None
        size += len(chunk)
        if size > limit or inflater.unconsumed_tail:
            raise DecompressedTooLarge(f"the body exceeds {limit} bytes once decompressed",
                                       limit=limit)
        if not inflater.eof:
            raise InvalidPayload("the gzip body is truncated")
        out.append(chunk)
        data = inflater.unused_data
    return b"".join(out)


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
