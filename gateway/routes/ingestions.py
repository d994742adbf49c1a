"""/v1/ingestions: open a session, send chunks, close it, read its status, list, statistics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from gateway.accounting import RequestOutcome
from gateway.auth import authenticate, authorize
from gateway.budget import Hold
from gateway.chunks import chunk_step
from gateway.errors import DatasetNotFound, InvalidParameter, UnsupportedMediaType
from gateway.ingest import Answer, IngestRequest
from gateway.payload import JSON, check_declared_length, check_encoding, gunzip
from gateway.protocol import add_routes, header, read_body
from gateway.routes.events import content_type, idempotency_key, recorded, respond
from gateway.routes.stats import page, read_stats
from gateway.sessions import STATUSES, Sessions, location, parse_close, parse_create
from gateway.state import REQUEST_ID, STATE
from schemas import outcomes as o
from schemas import windows as w
from schemas.catalogue import Principal
from schemas.dataset import Dataset

SESSIONS = web.AppKey("sessions", Sessions)
CONTROL_MAX_BYTES = 16 * 1024  # bodies of create and close requests


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _principal(request: web.Request) -> Principal:
    return authenticate(request.app[STATE].catalogue, header(request, "Authorization"))


async def _control_body(request: web.Request, hold: Hold) -> bytes:
    """The JSON body of an open or close request (inflated when gzip-compressed), held in
    ``hold`` as every body is."""
    if content_type(request) != JSON:
        raise UnsupportedMediaType("send application/json: opening and closing a session "
                                   "take one JSON object")
    gzipped = check_encoding(header(request, "Content-Encoding"))
    check_declared_length(request.content_length, CONTROL_MAX_BYTES)
    body = await read_body(request, CONTROL_MAX_BYTES,
                           request.app[STATE].settings.body_timeout_s, hold)
    return await gunzip(body, CONTROL_MAX_BYTES, hold) if gzipped else body


def _control_hold(request: web.Request) -> Hold:
    """The budget's hold for an open or close request: its dataset is not known before its
    body is read, so its waits (if any: the body is 16 KiB at most) count under none."""
    return request.app[STATE].ingestor.budget.hold("")


async def create_session(request: web.Request) -> web.Response:
    received_at_ms = _now_ms()
    state = request.app[STATE]
    catalogue = state.catalogue  # the request's, whatever a reload does while its body comes
    principal = authenticate(catalogue, header(request, "Authorization"))
    with _control_hold(request) as hold:
        body = await _control_body(request, hold)
        spec = parse_create(body, state.settings)
        dataset = authorize(catalogue, principal, spec.dataset)
        answer = await state.ingestor.ingest(
            IngestRequest(dataset, principal, body, False, JSON, False,
                          idempotency_key(request), request[REQUEST_ID], received_at_ms),
            hold, process=request.app[SESSIONS].creation(spec), operation="open")
    response = respond(answer)
    if answer.replayed and answer.status == 201:  # the stored answer keeps no headers
        response.headers["Location"] = location(orjson.loads(answer.body)["ingestion_id"])
    return response


async def get_session(request: web.Request) -> web.Response:
    session = await request.app[SESSIONS].get(request.match_info["ingestion_id"],
                                              _principal(request))
    return web.json_response(session.document())


async def patch_session(request: web.Request) -> web.Response:
    principal = _principal(request)
    with _control_hold(request) as hold:
        parse_close(await _control_body(request, hold))
    session = await request.app[SESSIONS].close(request.match_info["ingestion_id"], principal)
    return web.json_response(session.document())


async def list_sessions(request: web.Request) -> web.Response:
    catalogue = request.app[STATE].catalogue
    principal = _principal(request)
    wanted = request.query.get("dataset")
    if wanted:
        datasets = [authorize(catalogue, principal, wanted).id]
    else:
        datasets = [d.id for d in catalogue if principal.may_write(d.id)]
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidParameter(f"status must be one of {', '.join(STATUSES)}")
    start, size = page(request)
    found = await request.app[SESSIONS].listing(principal, datasets, status, start, size)
    return web.json_response({
        "total": found.total,
        "from": start,
        "size": size,
        "truncated": found.truncated,
        "ingestions": [s.document() for s in found.sessions],
    })


async def session_stats(request: web.Request) -> web.Response:
    session = await request.app[SESSIONS].get(request.match_info["ingestion_id"],
                                              _principal(request))
    stats, windows = await read_stats(request.app[STATE].redis,
                                      [o.session_stats_key(session.id)],
                                      w.session_scope(session.id))
    return web.json_response({"ingestion_id": session.id, "dataset": session.dataset,
                              "totals": stats[0], "windows": windows})


async def post_chunk(request: web.Request) -> web.Response:
    received_at_ms = _now_ms()
    state = request.app[STATE]
    catalogue = state.catalogue  # the request's, whatever a reload does meanwhile
    principal = authenticate(catalogue, header(request, "Authorization"))
    session_id = request.match_info["ingestion_id"]
    dataset = catalogue.get(await request.app[SESSIONS].owner(session_id, principal))
    if dataset is None:
        raise DatasetNotFound("the session's dataset is no longer in the catalogue")
    outcome = RequestOutcome(dataset.id, principal.key_id, request[REQUEST_ID], received_at_ms,
                             201, bytes=request.content_length or 0, session_id=session_id)
    return await recorded(state.accountant, outcome,
                          _chunk(request, principal, dataset, outcome))


async def _chunk(request: web.Request, principal: Principal, dataset: Dataset,
                 outcome: RequestOutcome) -> Answer:
    state = request.app[STATE]
    sessions = request.app[SESSIONS]
    mime = content_type(request)
    gzipped = check_encoding(header(request, "Content-Encoding"))
    limit = sessions.chunk_limit(dataset)
    check_declared_length(request.content_length, limit)
    token = idempotency_key(request)
    with state.ingestor.budget.hold(dataset.id) as hold:  # given back once answered, or not
        body = await read_body(request, limit, state.settings.body_timeout_s, hold)
        outcome.bytes = len(body)
        session_id = outcome.session_id
        return await state.ingestor.ingest(
            IngestRequest(dataset, principal, body, gzipped, mime, True, token,
                          outcome.request_id, outcome.received_at_ms, session_id=session_id),
            hold, process=chunk_step(sessions, state.publisher,
                                     state.settings.max_reported_errors, session_id))


def setup(app: web.Application) -> None:
    async def sessions(app: web.Application) -> AsyncIterator[None]:
        # runs after gateway.app's resources context (registered before this), which made STATE
        state = app[STATE]
        app[SESSIONS] = Sessions(state.redis, state.settings)
        app[SESSIONS].start()
        yield
        await app[SESSIONS].stop()  # before Redis is closed: chunk ends still waiting

    app.cleanup_ctx.append(sessions)
    add_routes(
        app,
        ("POST", "/v1/ingestions", create_session),
        ("GET", "/v1/ingestions", list_sessions),
        ("GET", "/v1/ingestions/{ingestion_id}", get_session),
        ("PATCH", "/v1/ingestions/{ingestion_id}", patch_session),
        ("POST", "/v1/ingestions/{ingestion_id}/chunks", post_chunk),
        ("GET", "/v1/ingestions/{ingestion_id}/stats", session_stats),
    )
