"""Structured logs: JSON lines, and the request id on every line logged while serving it."""

from __future__ import annotations

import logging
import sys

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import ACCESS_LOG, edge
from gateway.errors import RateLimited
from schemas import logs


def _line(record: logging.LogRecord) -> dict:
    return orjson.loads(logs.JsonFormatter().format(record))


def test_a_line_is_one_json_object_with_extra_fields_and_the_exception():
    logger = logging.getLogger("sluice.test")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord("sluice.test", logging.ERROR, __file__, 1, "failed %s",
                                   ("x",), exc_info=sys.exc_info(), extra={"dataset": "sales"})
    line = _line(record)
    assert line["msg"] == "failed x"
    assert line["level"] == "ERROR"
    assert line["logger"] == "sluice.test"
    assert line["dataset"] == "sales"
    assert "ValueError: boom" in line["exc"]
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert "request_id" not in line


def test_the_request_id_comes_from_the_context():
    token = logs.REQUEST_ID.set("req_abc")
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
        assert _line(record)["request_id"] == "req_abc"
    finally:
        logs.REQUEST_ID.reset(token)
    assert "request_id" not in _line(logging.LogRecord("x", logging.INFO, "", 1, "m", (), None))


def test_values_json_cannot_encode_are_written_as_text():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.thing = {1, 2}.__class__  # a type: not JSON
    assert _line(record)["thing"] == str(set)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def captured():
    handler = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(level)


async def test_every_line_logged_while_serving_a_request_carries_its_id(captured):
    """Through the real middleware chain: handler logs, errors, access log lines."""
    app = web.Application(middlewares=[edge])
    app[ACCESS_LOG] = True
    work = logging.getLogger("sluice.work")

    async def fine(request: web.Request) -> web.Response:
        work.info("working")
        return web.json_response({})

    async def limited(request: web.Request) -> web.Response:
        work.warning("refusing")
        raise RateLimited("slow down", headers={"Retry-After": "1"})

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app.router.add_get("/fine", fine)
    app.router.add_get("/limited", limited)
    app.router.add_get("/broken", broken)
    async with TestClient(TestServer(app)) as client:
        for path, rid, status in (("/fine", "r-1", 200), ("/limited", "r-2", 429),
                                  ("/broken", "r-3", 500)):
            resp = await client.get(path, headers={"X-Request-ID": rid})
            assert resp.status == status
            assert resp.headers["X-Request-ID"] == rid
        generated = await client.get("/fine")
    ours = [line for line in captured if line["logger"].startswith(("sluice", "gateway"))]
    by_id: dict[str, list[str]] = {}
    for line in ours:
        by_id.setdefault(line.get("request_id"), []).append(line["msg"])
    assert by_id["r-1"] == ["working", "GET /fine 200"]
    assert by_id["r-2"] == ["refusing", "GET /limited 429"]
    assert by_id["r-3"] == ["unhandled error", "GET /broken 500"]
    assert by_id[generated.headers["X-Request-ID"]] == ["working", "GET /fine 200"]
    assert None not in by_id
    access = [line for line in ours if line["logger"] == "sluice.access"]
    assert {line["status"] for line in access} == {200, 429, 500}
    assert all(line["route"] in ("/fine", "/limited", "/broken") for line in access)
    assert all(line["duration_ms"] >= 0 for line in access)
