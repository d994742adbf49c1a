"""Read APIs of what happened: dataset statistics and a connector's request log."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from gateway.auth import authenticate, authorize
from gateway.errors import Forbidden, InvalidHeader, NotFound, RedisUnavailable
from gateway.state import STATE
from schemas import outcomes as o

MAX_PAGE = 1000


def _stats(raw: dict[bytes, bytes]) -> dict[str, Any]:
    values = {k.decode(): int(v) for k, v in raw.items()}
    out: dict[str, Any] = {name: values.get(name, 0) for name in o.COUNTERS}
    for name in (o.FIRST_EVENT_AT, o.LAST_EVENT_AT):
        out[name] = values.get(name)
    return out


async def dataset_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, request.headers.get("Authorization"))
    dataset = authorize(state.catalogue, principal, request.match_info["dataset"])
    try:
        connectors = sorted(c.decode() for c in
                            await state.redis.smembers(o.connectors_key(dataset.id)))
        pipe = state.redis.pipeline(transaction=False)
        pipe.hgetall(o.stats_key(dataset.id))
        for connector in connectors:
            pipe.hgetall(o.stats_key(dataset.id, connector))
        results = await pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
    return web.json_response({
        "dataset": dataset.id,
        "totals": _stats(results[0]),
        "connectors": {c: _stats(r) for c, r in zip(connectors, results[1:], strict=True)},
    })


def _page(request: web.Request) -> tuple[int, int]:
    try:
        start = int(request.query.get("from", "0"))
        size = int(request.query.get("size", "50"))
    except ValueError:
        raise InvalidHeader("from and size must be integers") from None
    if start < 0 or not 1 <= size <= MAX_PAGE:
        raise InvalidHeader(f"from must be >= 0 and size between 1 and {MAX_PAGE}")
    return start, size


def _entry(raw: dict[bytes, bytes], errors: list[bytes]) -> dict[str, Any]:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    counts = {name: int(fields.get(name, 0)) for name in
              (o.RECEIVED, o.ACCEPTED, o.REJECTED, o.WRITTEN, o.DUPLICATES, o.FAILED)}
    logged = orjson.loads(fields["errors"]) if "errors" in fields else []
    logged += [orjson.loads(e) for e in errors]
    return {
        "request_id": fields.get("request_id"),
        "timestamp": int(fields["received_at"]) if "received_at" in fields else None,
        "dataset": fields.get("dataset"),
        "http_status": int(fields.get("http_status", 202)),
        "code": fields.get("code"),
        "items_received": counts[o.RECEIVED],
        "items_accepted": counts[o.ACCEPTED],
        "items_rejected": counts[o.REJECTED],
        "items_written": counts[o.WRITTEN],
        "items_duplicate": counts[o.DUPLICATES],
        "items_failed": counts[o.FAILED],
        "status": o.processing_status({**fields, **counts}),
        "errors": logged[: o.MAX_LOGGED_ERRORS],
    }


async def connector_logs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, request.headers.get("Authorization"))
    connector = request.match_info["connector"]
    datasets = state.catalogue.datasets_of(connector)
    if datasets is None and connector != o.KAFKA_CONNECTOR:
        raise NotFound(f"no connector {connector!r}")
    if not (principal.admin or principal.key_id == connector
            or (datasets and principal.datasets & datasets)):
        raise Forbidden(f"this key may not read connector {connector!r}'s log")
    start, size = _page(request)
    log_key = o.connector_log_key(connector)
    try:
        total = await state.redis.zcard(log_key)
        ids = await state.redis.zrevrange(log_key, start, start + size - 1)
        pipe = state.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(o.request_key(rid.decode()))
            pipe.lrange(o.request_errors_key(rid.decode()), 0, o.MAX_LOGGED_ERRORS - 1)
        results = await pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
    entries = [_entry(results[i], results[i + 1]) for i in range(0, len(results), 2)
               if results[i]]
    return web.json_response({"connector": connector, "total": total, "from": start,
                              "size": size, "entries": entries})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/datasets/{dataset}/stats", dataset_stats)
    app.router.add_get("/v1/connectors/{connector}/logs", connector_logs)
