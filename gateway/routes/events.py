"""POST /v1/datasets/{dataset}/events: the push route."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable

from aiohttp import web

from gateway.accounting import Accountant, RequestOutcome
from gateway.auth import authenticate, authorize
from gateway.errors import ApiError, InvalidHeader
from gateway.ingest import Answer, IngestRequest
from gateway.payload import check_declared_length, check_encoding, media_type
from gateway.protocol import add_routes, header, read_body
from gateway.state import REQUEST_ID, STATE

# Printable ASCII without spaces, as the IETF Idempotency-Key draft and Stripe allow.
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
_TRUE = frozenset({"true", "1", "yes"})


def idempotency_key(request: web.Request) -> str | None:
    token = header(request, "Idempotency-Key")
    if token is None:
        return None
    token = token.strip()
    if len(token) > 2 and token[0] == token[-1] == '"':  # the IETF draft's form: a quoted
        token = token[1:-1]  # structured-field string, the same key as the bare text
    if not _IDEMPOTENCY_KEY_RE.match(token):
        raise InvalidHeader("Idempotency-Key must be 1-255 printable ASCII characters")
    return token


def content_type(request: web.Request) -> str:
    declared = header(request, "Content-Type")
    return media_type(request.content_type if declared else None, request.charset)


async def post_events(request: web.Request) -> web.Response:
    received_at_ms = time.time_ns() // 1_000_000
    state = request.app[STATE]
    principal = authenticate(state.catalogue, header(request, "Authorization"))
    dataset = authorize(state.catalogue, principal, request.match_info["dataset"])
    outcome = RequestOutcome(dataset.id, principal.key_id, request[REQUEST_ID], received_at_ms,
                             202, bytes=request.content_length or 0)
    return await recorded(state.accountant, outcome,
                          _ingest(request, state, principal, dataset, received_at_ms, outcome))


async def recorded(accountant: Accountant, outcome: RequestOutcome,
                   ingesting: Awaitable[Answer]) -> web.Response:
    """Await the ingestion, record its outcome once (answered or refused), respond."""
    try:
        answer = await ingesting
    except ApiError as exc:
        outcome.refused(exc)
        accountant.record(outcome)
        raise
    outcome.answered(answer)
    accountant.record(outcome)
    return respond(answer)


def respond(answer: Answer) -> web.Response:
    response = web.Response(status=answer.status, body=answer.body,
                            content_type="application/json", headers=answer.headers)
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def _ingest(request: web.Request, state, principal, dataset, received_at_ms: int,
                  outcome: RequestOutcome):
    item_key = header(request, "X-Item-Key")
    if item_key is not None and item_key != dataset.item_key:
        if dataset.item_key is None:
            raise InvalidHeader(f"X-Item-Key {item_key!r} was sent, but dataset {dataset.id!r} "
                                "has no item key: its events are appended, never replaced")
        raise InvalidHeader(f"X-Item-Key {item_key!r} does not match dataset "
                            f"{dataset.id!r}'s item key {dataset.item_key!r}")
    mime = content_type(request)
    gzipped = check_encoding(header(request, "Content-Encoding"))
    check_declared_length(request.content_length, dataset.max_request_bytes)
    token = idempotency_key(request)
    with state.ingestor.budget.hold(dataset.id) as hold:  # given back once answered, or not
        body = await read_body(request, dataset.max_request_bytes,
                               state.settings.body_timeout_s, hold)
        outcome.bytes = len(body)
        return await state.ingestor.ingest(IngestRequest(
            dataset=dataset,
            principal=principal,
            body=body,
            gzipped=gzipped,
            mime=mime,
            partial=(bool(request.query_string)
                     and request.query.get("partial", "").lower() in _TRUE),
            idempotency_key=token,
            request_id=request[REQUEST_ID],
            received_at_ms=received_at_ms,
        ), hold)


def setup(app: web.Application) -> None:
    add_routes(
        app,
        ("POST", "/v1/datasets/{dataset}/events", post_events),
    )
