"""The entry-topic record format shared by the gateway, workers and Kafka-native producers.

A record's value is one JSON event or a JSON array of events (UTF-8). Headers are optional;
a record without headers is valid and processed the same way (connector ``kafka``).
See docs/kafka-records.md for the contract as published to producers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import orjson

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


def encode_values(items: Sequence[object], max_bytes: int) -> list[bytes]:
    """Encode items as JSON-array record values, each at most ``max_bytes`` where possible.

    One request normally becomes one record (one append, atomic in Kafka). Only a request
    larger than ``max_bytes`` is split, at item boundaries; a single item larger than the
    limit stays whole and is left for the producer to accept or refuse.
    """
    whole = orjson.dumps(items)
    if len(whole) <= max_bytes or len(items) <= 1:
        return [whole]
    return list(_split(items, max_bytes))


def _split(items: Sequence[object], max_bytes: int) -> Iterator[bytes]:
    chunk: list[bytes] = []
    size = 2  # the brackets
    for item in items:
        encoded = orjson.dumps(item)
        extra = len(encoded) + (1 if chunk else 0)
        if chunk and size + extra > max_bytes:
            yield b"[" + b",".join(chunk) + b"]"
            chunk, size, extra = [], 2, len(encoded)
        chunk.append(encoded)
        size += extra
    if chunk:
        yield b"[" + b",".join(chunk) + b"]"


def dlq_topic(entry_topic: str) -> str:
    return entry_topic + DLQ_SUFFIX


def decode_value(value: bytes) -> list[object]:
    """Events of one record value: a JSON array is its elements, anything else one event."""
    decoded = orjson.loads(value)
    return decoded if isinstance(decoded, list) else [decoded]
