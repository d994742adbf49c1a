"""One chunk of an ingestion session: gate, parse, validate, publish, count, answer 201.

The step runs inside the Ingestor after admission (rate limit, Idempotency-Key), so a retried
chunk replays its first answer even after the session closed. Every record of the chunk is
checked against the dataset's schema; the valid ones are published with the session id in
their headers and the invalid ones are answered back with their errors, as Fynapse does. A
chunk the session refuses (closed, expired) publishes nothing; one that fails after the gate
(malformed body, broker away) releases its claim and counts nothing.
"""

from __future__ import annotations

from typing import Any

from gateway.ingest import Answer, IngestRequest, Process, raw_value
from gateway.payload import parse_items
from gateway.publisher import Publisher
from gateway.sessions import Sessions
from schemas.jsontext import dumps
from schemas.records import RecordMeta
from schemas.validation import Verdict, validate


def chunk_step(sessions: Sessions, publisher: Publisher, max_reported: int,
               session_id: str) -> Process:
    async def process(req: IngestRequest, body: bytes, headers: dict[str, str]) -> Answer:
        claim = await sessions.enter(session_id, req.principal.key_id, req.idempotency_key)
        counts: tuple[int, int, int] | None = None
        try:
            items = parse_items(body, req.mime)
            verdict = validate(req.dataset, items, max_reported, body)
            if verdict.valid:
                meta = RecordMeta(req.request_id, req.principal.key_id, req.received_at_ms,
                                  req.idempotency_key, session_id)
                await publisher.publish(req.dataset.entry_topic, verdict.valid, meta,
                                        raw_value(body, req.mime, verdict.invalid))
            counts = (len(items), len(verdict.valid), verdict.invalid)
        finally:
            await sessions.leave(claim, counts)
        body = dumps(answer(session_id, req, items, verdict))  # it quotes the failed records
        return Answer(201, body, headers, accepted=len(verdict.valid), rejected=verdict.invalid,
                      errors=[e.as_dict() for e in verdict.errors])

    return process


def answer(session_id: str, req: IngestRequest, items: list[Any],
           verdict: Verdict) -> dict[str, Any]:
    """The 201 body: counts, and each failed record (up to the cap) with its errors."""
    failed = [{"index": e.index, "errors": [{"path": e.path, "message": e.message}],
               "record": items[e.index]} for e in verdict.errors]
    return {
        "ingestion_id": session_id,
        "request_id": req.request_id,
        "dataset": req.dataset.id,
        "items_received": len(items),
        "items_accepted": len(verdict.valid),
        "items_rejected": verdict.invalid,
        "failed": failed,
        "failed_truncated": verdict.invalid > len(failed),
    }
