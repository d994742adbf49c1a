"""Decode and shape: Kafka records into rows, or into dead letters with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas import jsontext
from schemas import records as r
from schemas.columns import INT64_MAX, NUL_MESSAGE, may_hold_nul, nul_path
from schemas.structure import ShapeError, Structure
from workers.rows import Origin, Row


@dataclass(slots=True)
class DeadLetter:
    """An event (or a whole undecodable record) that cannot be stored, and why."""

    record: Any  # the aiokafka ConsumerRecord it came from
    value: bytes  # the event as JSON, or the record's raw value
    code: str  # MALFORMED_JSON, SHAPE_FAILED, STORE_REFUSED, MALFORMED_HEADER
    error: str
    index: int | None = None
    origin: Origin | None = None


@dataclass(slots=True)
class Decoded:
    rows: list[Row] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


_MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time the stores keep


def origin_of(record: Any) -> Origin:
    """The record's metadata from its headers; a record without headers is connector 'kafka'."""
    # NUL is valid UTF-8 but PostgreSQL keeps none in text: a header (any client's) with one
    # would fail the batch's write for ever
    # (a header with a null value, which Kafka allows, None here, is absent)
    headers = {k: v.decode("utf-8", "replace").replace("\x00", "\ufffd")
               for k, v in (record.headers or ()) if v is not None}
    # any client may write these headers: a value that is no time or part number falls back
    # (one beyond the stores' ranges would fail the batch's write for ever)
    received_ms = _decimal(headers.get(r.H_RECEIVED_AT), _MAX_EPOCH_MS)
    if received_ms is None:
        received_ms = min(max(record.timestamp, 0), _MAX_EPOCH_MS)
    part = _decimal(headers.get(r.H_PART, "0/1").partition("/")[0], INT64_MAX) or 0
    return Origin(
        request_id=headers.get(r.H_REQUEST_ID),
        connector=headers.get(r.H_CONNECTOR) or r.KAFKA_CONNECTOR,
        received_at=datetime.fromtimestamp(received_ms / 1000, UTC),
        session_id=headers.get(r.H_SESSION_ID),
        sync_id=headers.get(r.H_SYNC_ID),
        idempotency_key=headers.get(r.H_IDEMPOTENCY_KEY),
        part=part,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )


def _decimal(text: str | None, high: int) -> int | None:
    """A header's ASCII decimal number from 0 to ``high``, else None (str.isdigit alone also
    takes digits int() refuses, such as "²")."""
    if not text or not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    number = int(text)
    return number if number <= high else None


def decode(record: Any, structure: Structure, out: Decoded) -> tuple[Origin, int]:
    """Append the record's rows and dead letters to ``out``; its origin and event count."""
    base = origin_of(record)
    try:
        events = r.decode_value(record.value)
    except orjson.JSONDecodeError as exc:
        out.dead.append(DeadLetter(record, record.value or b"", "MALFORMED_JSON",
                                   f"the record value is not JSON: {exc}", origin=base))
        return base, 1
    shape = structure.row_values
    rows = out.rows
    # refused here too: Kafka-native producers do not pass the gateway's check
    nul = record.value is not None and may_hold_nul(record.value)
    for index, event in enumerate(events):
        try:
            if nul and (where := nul_path(event)) is not None:
                raise ShapeError(where, NUL_MESSAGE)
            rows.append(Row(shape(event), base, index))
        except ShapeError as exc:
            out.dead.append(letter(record, event, "SHAPE_FAILED", str(exc), index, base))
    return base, len(events)


def letter(record: Any, event: Any, code: str, error: str, index: int,
           origin: Origin) -> DeadLetter:
    """The dead letter of one event of ``record``: the event as JSON, at any depth orjson
    read it (``schemas.jsontext``; orjson itself writes only 254 levels)."""
    return DeadLetter(record, jsontext.dumps(event), code, error, index, origin)
