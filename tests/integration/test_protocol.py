"""Requests whose HTTP message cannot be read: problem+json, no key quoted, nothing published.

Sent over raw sockets, since no HTTP client writes such requests on purpose.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from gateway.protocol import MALFORMED_ROUTE
from schemas import metrics
from schemas.keys import KEY_PREFIX

pytestmark = pytest.mark.integration

PUSH = b"POST /v1/datasets/sales/events HTTP/1.1\r\nHost: sluice\r\n"
BODY = b'[{"region":"north","revenue":1}]'


async def exchange(port: int, *parts: bytes, pause: float = 0.0) -> tuple[int, dict, bytes]:
    """Send ``parts`` (``pause`` seconds apart) on a new connection; the status, headers and
    body of the answer. Each of these answers closes the connection: HTTP/1.0, or
    ``Connection: close``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, part in enumerate(parts):
            if index and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {name.lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines)}
        body = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
    version, status = status_line.split()[:2]
    assert version == "HTTP/1.0" or headers["connection"].lower() == "close"
    return int(status), headers, body


def assert_problem(status: int, headers: dict, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/problem+json")
    doc = orjson.loads(body)
    assert (doc["status"], doc["code"]) == (expected, code)
    assert doc["request_id"] == headers["x-request-id"]
    return doc


def malformed_count(status: int) -> float:
    value = metrics.HTTP_REQUESTS.labels("", MALFORMED_ROUTE, str(status))._value.get()
    return value


def secret_of(key: str) -> str:
    return key[len(KEY_PREFIX):].partition("_")[2]


def assert_not_quoted(key: str, body: bytes, caplog) -> None:
    secret = secret_of(key)
    assert secret not in body.decode("latin-1")
    logged = [r for r in caplog.records
              if secret in r.getMessage() or secret in (r.exc_text or "")
              or (r.exc_info and secret in repr(r.exc_info[1]))]
    assert not logged, [r.getMessage() for r in logged]


async def test_a_control_character_in_a_header_is_refused_without_quoting_the_key(
        gateway, caplog):
    caplog.set_level(logging.DEBUG)
    before = malformed_count(400)
    request = (PUSH + b"Authorization: Bearer " + gateway.key.encode() + b"\x01\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    status, headers, body = await exchange(gateway.client.port, request)
    doc = assert_problem(status, headers, body, 400, "MALFORMED_REQUEST")
    assert doc["detail"] == "Invalid header value char (the HTTP message could not be read)"
    assert "instance" not in doc
    assert_not_quoted(gateway.key, body, caplog)
    assert malformed_count(400) == before + 1
    assert await gateway.published() == []


async def test_a_header_over_8_kib_is_refused_with_431_without_quoting_it(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    before = malformed_count(431)
    request = (PUSH + b"Authorization: Bearer " + gateway.key.encode() + b"A" * 9000 + b"\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    status, headers, body = await exchange(gateway.client.port, request)
    doc = assert_problem(status, headers, body, 431, "HEADER_TOO_LARGE")
    assert doc["detail"] == ("the request line or a header field is longer than 8190 bytes")
    assert_not_quoted(gateway.key, body, caplog)
    assert malformed_count(431) == before + 1
    assert await gateway.published() == []


@pytest.mark.parametrize("request_bytes, detail", [
    (b"GARBAGE\r\n\r\n", "Invalid method encountered"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (PUSH + b"Content-Length: abc\r\n\r\n[]", "Invalid character in Content-Length"),
    (PUSH + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n",
     "Transfer-Encoding can't be present with Content-Length"),
], ids=["request-line", "long-target", "content-length", "both-lengths"])
async def test_unreadable_requests_get_a_problem_with_a_stable_code(gateway, request_bytes,
                                                                     detail):
    status, headers, body = await exchange(gateway.client.port, request_bytes)
    if detail is None:
        assert_problem(status, headers, body, 431, "HEADER_TOO_LARGE")
    else:
        doc = assert_problem(status, headers, body, 400, "MALFORMED_REQUEST")
        assert doc["detail"] == f"{detail} (the HTTP message could not be read)"


def chunked_push(key: str) -> tuple[bytes, bytes]:
    """Headers of a chunked push, and a chunk whose framing breaks after its data."""
    head = (PUSH + b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    return head, b"%x\r\n" % len(BODY) + BODY + b"XX0\r\n\r\n"  # no CRLF after the data


async def test_broken_chunked_framing_in_the_headers_packet_publishes_nothing(gateway):
    head, chunk = chunked_push(gateway.key)
    status, headers, body = await exchange(gateway.client.port, head + chunk)
    assert_problem(status, headers, body, 400, "MALFORMED_REQUEST")
    assert await gateway.published() == []


async def test_a_body_that_stops_arriving_gets_408_and_publishes_nothing(make_gateway):
    """A client that sends its headers and then stalls, and (an aiohttp limitation) one whose
    chunked framing breaks after the route began reading, which aiohttp leaves the handler
    waiting on: both are answered once the body timeout passes, on a closed connection."""
    gateway = await make_gateway(SLUICE_BODY_TIMEOUT_S="0.5")
    head, chunk = chunked_push(gateway.key)
    for parts in ((head, chunk[:10]), (head, chunk)):
        started = asyncio.get_running_loop().time()
        status, headers, body = await exchange(gateway.client.port, *parts, pause=0.2)
        assert_problem(status, headers, body, 408, "REQUEST_TIMEOUT")
        assert 0.5 <= asyncio.get_running_loop().time() - started < 5
    assert await gateway.published() == []


async def test_expect_100_continue_is_answered_when_the_body_is_needed(gateway):
    """Other expectations are ignored (RFC 9110 allows it); 100 Continue comes only once every
    check that needs no body has passed, so a refused client never sends its body."""
    port = gateway.client.port
    head = (PUSH + b"Authorization: Bearer " + gateway.key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(BODY))
    # an expectation Sluice does not know is ignored (RFC 9110 allows it): a normal answer
    status, _, body = await exchange(port, head + b"Expect: teapot\r\nConnection: close\r\n\r\n"
                                     + BODY)
    assert status == 202, body
    # 100-continue: the interim answer comes before the body is sent
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(BODY)
        final = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert final.startswith(b"HTTP/1.1 202 "), final
    # refused before its body is needed (an unknown key): no 100 Continue, the answer at once
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace(gateway.key.encode(), gateway.key.encode()[:-4] + b"abcd")
                     + b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        refused = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert refused.startswith(b"HTTP/1.1 401 "), refused
    assert len(await gateway.published()) == 2


@pytest.mark.parametrize("name, second, code", [
    ("Authorization", b"Bearer sk_other_secret", "INVALID_HEADER"),
    ("Idempotency-Key", b"order-2", "INVALID_HEADER"),
    ("X-Item-Key", b"region", "INVALID_HEADER"),
    ("Content-Encoding", b"identity", "INVALID_HEADER"),
    ("Content-Type", b"application/x-ndjson", "MALFORMED_REQUEST"),  # aiohttp's parser
])
async def test_a_header_sent_twice_is_refused_not_guessed_between(gateway, name, second, code):
    """A proxy in front may read the other copy: the gateway picks neither."""
    first = {"Authorization": b"Bearer " + gateway.key.encode(), "Idempotency-Key": b"order-1",
             "X-Item-Key": b"region", "Content-Type": b"application/json",
             "Content-Encoding": b"identity"}
    head = b"".join(b"%s: %s\r\n" % (k.encode(), v) for k, v in first.items())
    request = (PUSH + head + name.encode() + b": " + second + b"\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
    status, headers, body = await exchange(gateway.client.port, request)
    doc = assert_problem(status, headers, body, 400, code)
    if code == "INVALID_HEADER":
        assert doc["detail"] == f"{name} was sent 2 times; send it once"
    assert await gateway.published() == []
    # and twice the same X-Request-ID is replaced, as any unusable one is
    status, headers, _ = await exchange(gateway.client.port, (
        b"GET /healthz HTTP/1.1\r\nHost: sluice\r\nX-Request-ID: a\r\nX-Request-ID: a\r\n"
        b"Connection: close\r\n\r\n"))
    assert status == 200 and headers["x-request-id"].startswith("req_")


async def test_a_key_whose_bytes_are_not_utf8_is_401_and_publishes_nothing(gateway, caplog):
    """aiohttp hands such header bytes over as surrogates; the key must not match, not fail."""
    caplog.set_level(logging.DEBUG)
    key_id = gateway.key[len(KEY_PREFIX):].partition("_")[0]
    request = (PUSH + b"Connection: close\r\nAuthorization: Bearer "
               + f"{KEY_PREFIX}{key_id}_".encode() + b"\xff\xfe\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    status, headers, body = await exchange(gateway.client.port, request)
    assert_problem(status, headers, body, 401, "UNAUTHORIZED")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await gateway.published() == []


async def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(gateway, caplog):
    """aiohttp ends the body with "Connection lost": that is the client's doing, counted as
    499 (never read), not a 500 with a traceback that feeds the 5xx alert."""
    caplog.set_level(logging.DEBUG)
    counted = metrics.HTTP_REQUESTS.labels("sales", "/v1/datasets/{dataset}/events", "499")
    before = counted._value.get()
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.client.port)
    writer.write(PUSH + b"Authorization: Bearer " + gateway.key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 + BODY[:5])
    await writer.drain()
    await asyncio.sleep(0.2)  # the route is reading the body
    writer.close()
    for _ in range(100):
        if counted._value.get() > before:
            break
        await asyncio.sleep(0.05)
    assert counted._value.get() == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await gateway.published() == []
