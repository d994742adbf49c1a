"""The entry-topic record format shared by the gateway, workers and Kafka-native producers.

A record's value is one JSON event or a JSON array of events (UTF-8). Headers are optional;
a record without headers is valid and processed the same way (connector ``kafka``).
See docs/kafka-records.md for the contract as published to producers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from schemas.jsontext import dumps

# Header names (bytes values, ASCII). Keep in step with docs/kafka-records.md.
H_REQUEST_ID = "sluice-request-id"
H_CONNECTOR = "sluice-connector"
H_RECEIVED_AT = "sluice-received-at"  # epoch milliseconds, decimal ASCII
H_SESSION_ID = "sluice-session-id"
H_SYNC_ID = "sluice-sync-id"
H_IDEMPOTENCY_KEY = "sluice-idempotency-key"
H_PART = "sluice-part"  # "<index>/<count>" when one request spans several records
H_CONTENT_TYPE = "content-type"

# Dead-letter headers, added to the original record's headers.
H_ERROR_CODE = "sluice-error-code"
H_ERROR = "sluice-error"
H_SOURCE_TOPIC = "sluice-source-topic"
H_SOURCE_PARTITION = "sluice-source-partition"
H_SOURCE_OFFSET = "sluice-source-offset"
H_SOURCE_INDEX = "sluice-source-index"  # the event's position in the record's array
# The value's size in bytes, when the value was too large to dead-letter and was left out
# (it stays in the source record, at the source coordinates)
H_VALUE_OMITTED = "sluice-value-omitted"
DLQ_SUFFIX = ".dlq"

CONTENT_TYPE_JSON = b"application/json"
KAFKA_CONNECTOR = "kafka"  # connector name for records that carry none


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """What the gateway knows about a request, carried as record headers."""

    request_id: str
    connector: str
    received_at_ms: int
    idempotency_key: str | None = None
    session_id: str | None = None
    sync_id: str | None = None

    def headers(self, part: int = 0, parts: int = 1) -> list[tuple[str, bytes]]:
        headers = [
            (H_REQUEST_ID, self.request_id.encode()),
            (H_CONNECTOR, self.connector.encode()),
            (H_RECEIVED_AT, str(self.received_at_ms).encode()),
            (H_CONTENT_TYPE, CONTENT_TYPE_JSON),
        ]
        if self.idempotency_key is not None:
            headers.append((H_IDEMPOTENCY_KEY, self.idempotency_key.encode()))
        if self.session_id is not None:
            headers.append((H_SESSION_ID, self.session_id.encode()))
        if self.sync_id is not None:
            headers.append((H_SYNC_ID, self.sync_id.encode()))
        if parts > 1:
            headers.append((H_PART, f"{part}/{parts}".encode()))
        return headers


def encode_values(items: Sequence[object], max_bytes: int,
                  size_hint: int | None = None) -> list[bytes]:
    """Encode items as JSON-array record values, each at most ``max_bytes`` where possible.

    One request normally becomes one record (one append, atomic in Kafka). Only a request
    larger than ``max_bytes`` is split, at item boundaries, into values of which no two
    neighbours would fit in one; a single item larger than the limit stays whole and is left
    for the producer to accept or refuse. ``size_hint`` is the size of the JSON body the
    items came from: one larger than the limit is split at once instead of first being
    encoded whole.
    """
    if size_hint is None or size_hint <= max_bytes or len(items) <= 1:
        whole = dumps(items)
        if len(whole) <= max_bytes or len(items) <= 1:
            return [whole]
        size_hint = len(whole)
    return _merged(_split(items, size_hint, max_bytes), max_bytes)


def _split(items: Sequence[object], size: int, max_bytes: int) -> list[bytes]:
    """Slices of equal item counts, as many as ``size`` needs, each encoded in one call; a
    slice still too large is split again, down to single items. (Encoding item by item and
    packing them cost four times as much for a 1 MiB request of 9,000 events.)"""
    slices = min(len(items), -(-size // max_bytes))  # at least 2: size > max_bytes
    step = -(-len(items) // slices)
    out: list[bytes] = []
    for start in range(0, len(items), step):
        part = items[start:start + step]
        encoded = dumps(part)
        if len(encoded) > max_bytes and len(part) > 1:
            out += _split(part, len(encoded), max_bytes)
        else:
            out.append(encoded)
    return out


def _merged(values: list[bytes], max_bytes: int) -> list[bytes]:
    """Neighbouring arrays joined while the joined array fits ("[a]" and "[b]": "[a,b]")."""
    out = [values[0]]
    for value in values[1:]:
        if len(out[-1]) + len(value) - 1 <= max_bytes:
            out[-1] = out[-1][:-1] + b"," + value[1:]
        else:
            out.append(value)
    return out


def dlq_topic(entry_topic: str) -> str:
    return entry_topic + DLQ_SUFFIX


def decode_value(value: bytes) -> list[object]:
    """Events of one record value: a JSON array is its elements, anything else one event."""
    decoded = orjson.loads(value)
    return decoded if isinstance(decoded, list) else [decoded]
