"""Read APIs of what happened: dataset statistics and a connector's request log.

Statistics are totals since the beginning plus ``windows``: the same counters over the last
minute, hour and day, from the bucketed counters both sides write (schemas.windows).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.auth import authenticate, authorize
from gateway.errors import Forbidden, InvalidParameter, NotFound, RedisUnavailable
from gateway.protocol import add_routes, header
from gateway.state import STATE
from schemas import outcomes as o
from schemas import windows as w
from schemas.catalogue import Principal

MAX_PAGE = 1000
MAX_FROM = 2**31 - 1  # beyond any listing; Redis refuses indices past 64 bits (as a 503)


def _stats(raw: dict[bytes, bytes]) -> dict[str, Any]:
    values = {k.decode(): int(v) for k, v in raw.items()}
    out: dict[str, Any] = {name: values.get(name, 0) for name in o.COUNTERS}
    for name in (o.FIRST_EVENT_AT, o.LAST_EVENT_AT):
        out[name] = values.get(name)
    return out


async def read_stats(redis: Redis, keys: Sequence[str], scope: str
                     ) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """The statistics hashes at ``keys``, and the windows of ``scope``, in one round trip."""
    buckets = w.read_keys(scope, int(time.time() * 1000))
    pipe = redis.pipeline(transaction=False)
    for key in (*keys, *buckets):
        pipe.hgetall(key)
    try:
        results = await pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
    return [_stats(r) for r in results[:len(keys)]], w.summed(results[len(keys):], o.COUNTERS)


async def dataset_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, header(request, "Authorization"))
    dataset = authorize(state.catalogue, principal, request.match_info["dataset"])
    try:
        connectors = sorted(c.decode() for c in
                            await state.redis.smembers(o.connectors_key(dataset.id)))
    except RedisError as exc:
        raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
    keys = [o.stats_key(dataset.id), *(o.stats_key(dataset.id, c) for c in connectors)]
    stats, windows = await read_stats(state.redis, keys, w.dataset_scope(dataset.id))
    return web.json_response({
        "dataset": dataset.id,
        "totals": stats[0],
        "windows": windows,
        "connectors": dict(zip(connectors, stats[1:], strict=True)),
    })


def page(request: web.Request) -> tuple[int, int]:
    """The ``from`` and ``size`` query parameters of a listing."""
    try:
        start = int(request.query.get("from", "0"))
        size = int(request.query.get("size", "50"))
    except ValueError:
        raise InvalidParameter("from and size must be integers") from None
    if not 0 <= start <= MAX_FROM or not 1 <= size <= MAX_PAGE:
        raise InvalidParameter(f"from must be between 0 and {MAX_FROM} and size between 1 "
                               f"and {MAX_PAGE}")
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


# One page of the entries of a connector's log whose dataset is one of ARGV[4...], newest
# first, and how many there are. KEYS: the log. ARGV: the request hash prefix
# (request_key(connector, '')), entries to skip, page size, then the datasets.
# It reads every entry's dataset (about 0.7 us each: 7 ms for a full log of 10,000), in
# Redis: a command per entry from here would cost the event loop about 150 ms. The hashes
# are not in KEYS but share the log's hash tag: same slot on Redis Cluster (SORT ... GET
# would be faster, but needs every key readable under ACLs, and Redis Cluster refuses it).
_VISIBLE = """
local allowed = {}
for i = 5, #ARGV do allowed[ARGV[i]] = true end
local first = tonumber(ARGV[2])
local size = tonumber(ARGV[3])
local after = ARGV[4]  -- a cursor: the page starts after this entry ('' for none)
local seen, page = 0, {}
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local dataset = redis.call('HGET', ARGV[1] .. id, 'dataset')
  if dataset and allowed[dataset] then
    seen = seen + 1
    if id == after then
      first, after = seen, ''
    elseif after == '' and seen > first and #page < size then
      page[#page + 1] = id
    end
  end
end
if after ~= '' then return {-1, {}} end
return {seen, page, first}
"""

# One page after a cursor, for a key that sees every entry: the cursor's rank and the page
# read at once (a rank read apart would shift with every entry written in between).
# KEYS: the log. ARGV: the cursor (a request id), page size.
_AFTER = """
local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
if not rank then return {-1, {}, 0} end
return {redis.call('ZCARD', KEYS[1]),
        redis.call('ZREVRANGE', KEYS[1], rank + 1, rank + tonumber(ARGV[2])), rank + 1}
"""


async def _page_ids(redis: Redis, connector: str, principal: Principal, start: int,
                    size: int, after: str | None) -> tuple[int, list[str], int]:
    """How many entries of the connector's log ``principal`` may see, and the request ids of
    one page of them, newest first. An admin key sees every entry, and so does the connector
    itself (each is a request it sent; its own log needs no filter, the usual read); any
    other key only those of the datasets it may write (a connector's log holds every
    dataset it sent to), and ``from``, ``size`` and the total count those, so a page is never
    short and never skips an entry for the ones left out. ``after`` (a request id the key
    sees) starts the page after that entry instead of at ``start``; the offset the page
    starts at is returned too."""
    log_key = o.connector_log_key(connector)
    if principal.admin or principal.key_id == connector:
        if after is not None:
            total, ids, start = await redis.register_script(_AFTER)(
                keys=[log_key], args=[after, size])
            _check_cursor(total, after)
        else:
            total = await redis.zcard(log_key)
            ids = await redis.zrevrange(log_key, start, start + size - 1)
        return total, [rid.decode() for rid in ids], start
    if not principal.datasets:
        _check_cursor(-1 if after is not None else 0, after)
        return 0, [], start
    total, ids, *first = await redis.register_script(_VISIBLE)(
        keys=[log_key], args=[o.request_key(connector, ""), start, size, after or "",
                              *sorted(principal.datasets)])
    _check_cursor(total, after)
    return total, [rid.decode() for rid in ids], first[0]


def _check_cursor(total: int, after: str | None) -> None:
    if total < 0:
        raise InvalidParameter(f"after: no entry {after!r} in this log that this key may see "
                               "(trimmed, or never logged)")


def _cursor(request: web.Request) -> str | None:
    """The ``after`` query parameter: a request id; exclusive with ``from``."""
    after = request.query.get("after")
    if after is None:
        return None
    if "from" in request.query:
        raise InvalidParameter("after and from cannot be given together")
    if not after or len(after) > 256:
        raise InvalidParameter("after must be the request id of an entry (1-256 characters)")
    return after


async def connector_logs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, header(request, "Authorization"))
    connector = request.match_info["connector"]
    datasets = state.catalogue.datasets_of(connector)
    if datasets is None and connector != o.KAFKA_CONNECTOR:
        raise NotFound(f"no connector {connector!r}")
    if not (principal.admin or principal.key_id == connector
            or (datasets and principal.datasets & datasets)):
        raise Forbidden(f"this key may not read connector {connector!r}'s log")
    start, size = page(request)
    after = _cursor(request)
    try:
        total, ids, start = await _page_ids(state.redis, connector, principal, start, size,
                                            after)
        pipe = state.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(o.request_key(connector, rid))
            pipe.lrange(o.request_errors_key(connector, rid), 0, o.MAX_LOGGED_ERRORS - 1)
        results = await pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
    entries = [_entry(results[i], results[i + 1]) for i in range(0, len(results), 2)
               if results[i]]
    more = ids and start + len(ids) < total
    return web.json_response({"connector": connector, "total": total, "from": start,
                              "size": size, "entries": entries,
                              "next": ids[-1] if more else None})


def setup(app: web.Application) -> None:
    add_routes(
        app,
        ("GET", "/v1/datasets/{dataset}/stats", dataset_stats),
        ("GET", "/v1/connectors/{connector}/logs", connector_logs),
    )
