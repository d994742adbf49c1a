"""Ingesting one request: admit, parse, validate, publish, and only then acknowledge.

Knows nothing of HTTP: it takes an IngestRequest and returns an Answer or raises an ApiError.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.admission import Admission, Admitter, Verdict
from gateway.budget import BodyBudget, Hold
from gateway.errors import (
    IdempotencyInFlight,
    IdempotencyMismatch,
    RateLimited,
    ValidationFailed,
)
from gateway.payload import JSON, gunzip, parse_items
from gateway.publisher import Publisher
from schemas import redis_keys
from schemas.catalogue import Principal
from schemas.dataset import Dataset, RateLimit
from schemas.records import RecordMeta
from schemas.validation import validate


@dataclass(frozen=True, slots=True)
class IngestRequest:
    dataset: Dataset
    principal: Principal
    body: bytes  # as received: gzip-compressed when ``gzipped``
    gzipped: bool
    mime: str
    partial: bool
    idempotency_key: str | None
    request_id: str
    received_at_ms: int
    session_id: str | None = None
    sync_id: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False
    accepted: int = 0  # items published by this request (0 for a replay)
    rejected: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # of the rejected items


# The step between admission and the stored answer: (request, inflated body, rate headers).
Process = Callable[[IngestRequest, bytes, dict[str, str]], Awaitable[Answer]]


class Ingestor:
    def __init__(self, admitter: Admitter, publisher: Publisher, max_reported_errors: int,
                 budget: BodyBudget):
        self._admitter = admitter
        self._publisher = publisher
        self._max_errors = max_reported_errors
        self.budget = budget

    async def ingest(self, req: IngestRequest, hold: Hold, process: Process | None = None,
                     operation: str = "") -> Answer:
        """Inflate, admit, then ``process`` (parse, validate, publish unless given another
        step, as ingestion sessions do for chunks and creation), then store or release the
        answer.

        ``hold`` holds the body's bytes in the budget already (the route read it under it, and
        releases it once the answer is built); a gzip body's inflated bytes join them as they
        are inflated. A body that finds no room is refused (503) before admission: no
        Idempotency-Key claimed, no rate-limit token spent.

        ``operation`` names a step other than a push or a chunk (they differ already by the
        session id), so that one Idempotency-Key sent to two routes is refused as reused
        rather than replaying the other route's answer."""
        dataset = req.dataset
        body = (await gunzip(req.body, dataset.max_decompressed_bytes, hold) if req.gzipped
                else req.body)
        key_id = req.principal.key_id
        idem = (redis_keys.idempotency_key(dataset.id, key_id, req.idempotency_key)
                if req.idempotency_key is not None else None)
        fingerprint = _fingerprint(req, body, operation) if idem else ""
        # The claim's owner is this call, never the client's X-Request-ID: a client retrying
        # with the same request id while the first attempt is in flight must get 409, and
        # only the Redis client's own retry of the admission call (same owner) proceeds.
        owner = secrets.token_hex(12) if idem else ""
        admission = await self._admitter.admit(
            redis_keys.rate_bucket_key(dataset.id, key_id), dataset.rate_limit, idem,
            fingerprint, owner)
        headers = _rate_headers(dataset.rate_limit, admission)
        _refuse(admission, headers)
        if admission.verdict is Verdict.REPLAY:
            stored = admission.replay or b"202{}"
            return Answer(int(stored[:3]), stored[3:], headers, replayed=True)
        try:
            answer = await (process or self._process)(req, body, headers)
        except BaseException:
            if idem is not None:
                await self._admitter.release(idem, owner)
            raise
        if idem is not None:  # stored with the next pipeline; the answer does not wait for it
            self._admitter.complete(idem, owner, answer.status, answer.body)
        return answer

    async def _process(self, req: IngestRequest, body: bytes, headers: dict[str, str]) -> Answer:
        items = parse_items(body, req.mime)
        verdict = validate(req.dataset, items, self._max_errors, body)
        errors = [e.as_dict() for e in verdict.errors]
        if verdict.invalid and (not req.partial or not verdict.valid):
            raise ValidationFailed(
                f"{verdict.invalid} of {len(items)} items do not match the schema of "
                f"dataset {req.dataset.id!r}; nothing was accepted",
                errors=errors, invalid_items=verdict.invalid, items_received=len(items),
                errors_truncated=verdict.invalid > len(errors))
        meta = RecordMeta(req.request_id, req.principal.key_id, req.received_at_ms,
                          req.idempotency_key, req.session_id, req.sync_id)
        await self._publisher.publish(req.dataset.entry_topic, verdict.valid, meta,
                                      raw_value(body, req.mime, verdict.invalid))
        result: dict[str, Any] = {
            "request_id": req.request_id,
            "dataset": req.dataset.id,
            "items_received": len(items),
            "items_accepted": len(verdict.valid),
        }
        if verdict.invalid:
            result["items_rejected"] = verdict.invalid
            result["rejected"] = errors
            result["rejected_truncated"] = verdict.invalid > len(errors)
        return Answer(202, orjson.dumps(result), headers, accepted=len(verdict.valid),
                      rejected=verdict.invalid, errors=errors)


def raw_value(body: bytes, mime: str, invalid: int) -> bytes | None:
    """The body itself as the record value, when it is JSON (not NDJSON) and every item in
    it is accepted: the record then holds exactly the accepted items, byte for byte as sent."""
    return body if mime == JSON and not invalid else None


def _fingerprint(req: IngestRequest, body: bytes, operation: str) -> str:
    """What makes two requests 'the same' for an Idempotency-Key: body, format, mode and
    route. (A push's fingerprint is as it was before ``operation``, so a retry across a
    rolling upgrade still replays.)"""
    digest = hashlib.sha256(body)
    digest.update(f"\0{req.mime}\0{int(req.partial)}\0{req.session_id or ''}".encode())
    if operation:
        digest.update(f"\0{operation}".encode())
    return digest.hexdigest()


def _rate_headers(rate: RateLimit, admission: Admission) -> dict[str, str]:
    if not rate.enabled:
        return {}
    return {
        "RateLimit-Limit": str(rate.burst),
        "RateLimit-Remaining": str(max(admission.remaining, 0)),
        "RateLimit-Reset": str(max(1, -(-admission.reset_ms // 1000))),
    }


def _refuse(admission: Admission, headers: dict[str, str]) -> None:
    verdict = admission.verdict
    if verdict is Verdict.RATE_LIMITED:
        retry = str(max(1, -(-admission.reset_ms // 1000)))
        raise RateLimited("the ingest key's request rate is exhausted; retry after "
                          f"{retry} s", headers={**headers, "Retry-After": retry})
    if verdict is Verdict.IN_FLIGHT:
        raise IdempotencyInFlight(headers={**headers, "Retry-After": "1"})
    if verdict is Verdict.BODY_MISMATCH:
        raise IdempotencyMismatch(headers=headers)
