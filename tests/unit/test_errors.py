"""The error catalogue: one stable code per failure, each in the README's table; parser
messages turned into details that never quote the request."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, LineTooLong

from gateway.errors import ERROR_CODES, HeaderTooLarge, InternalError, MalformedRequest
from gateway.protocol import reason, refusal

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_code_has_one_status_and_is_in_the_readme_table_with_it():
    statuses = {cls.code: {c.status for c in ERROR_CODES if c.code == cls.code}
                for cls in ERROR_CODES}
    assert all(len(found) == 1 for found in statuses.values()), statuses
    rows = set(re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", README.read_text(), re.M))
    missing = [(cls.status, cls.code) for cls in ERROR_CODES
               if (str(cls.status), cls.code) not in rows]
    assert not missing, missing


@pytest.mark.parametrize("exc, detail", [
    (BadHttpMessage("Invalid header value char:\n\n  b'Authorization: Bearer sk_a_SECRET\\x01'"
                    "\n  ^"), "Invalid header value char"),
    (BadHttpMessage("Transfer-Encoding can't be present with Content-Length:\n  b'x'"),
     "Transfer-Encoding can't be present with Content-Length"),
    (InvalidHeader(b"Authorization: Bearer sk_a_SECRET"), "Invalid HTTP header"),
    (BadStatusLine("sk_a_SECRET"), "Bad status line"),
    (BadHttpMessage("Too many headers received"), "Too many headers received"),
])
def test_a_parser_message_is_cut_before_it_quotes_the_request(exc, detail):
    assert reason(exc) == f"{detail} (the HTTP message could not be read)"
    error = refusal(400, exc)
    assert isinstance(error, MalformedRequest) and "SECRET" not in error.detail


def test_what_aiohttp_refuses_maps_to_a_stable_code():
    too_long = refusal(400, LineTooLong(b"Bearer sk_a_SECRET" * 600, 8190))
    assert isinstance(too_long, HeaderTooLarge) and "SECRET" not in too_long.detail
    assert "8190 bytes" in too_long.detail
    assert isinstance(refusal(500, RuntimeError("boom")), InternalError)
    assert refusal(400, None).detail == MalformedRequest.title
