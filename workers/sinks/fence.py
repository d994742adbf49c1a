"""Exactly once for append-only tables: offset fences and record keys, stored with the rows.

An append-only table (no item key, no event id) has no natural key. Rather than a unique index
over (topic, partition, offset, position), which every row pays for on insert, the store keeps
two small tables, written in the same transaction as the rows:

- ``_sluice_offsets``: per (table, topic, partition), the first offset not yet stored (the
  fence). A redelivered record lies below it and is skipped. Writers lock the fence rows they
  touch, so a worker that lost its partitions in a rebalance waits for the new owner's write
  and then sees its progress.
- ``_sluice_idempotency``: per record with an Idempotency-Key, (table, connector, key, part).
  A request published twice (retried after its Redis claim was lost) is stored once.

The rows then go into the table as they are (COPY in PostgreSQL) with no per-row check. This
relies on what the consumer does anyway: every row of a record comes in one write, and a
partition's records come in offset order.

The planning here is pure; each sink runs the statements in its own dialect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from workers.rows import Row

OFFSETS_TABLE = "_sluice_offsets"
KEYS_TABLE = "_sluice_idempotency"

Partition = tuple[str, int]
RecordKey = tuple[str, str, int]  # connector, idempotency key, part


def partitions(rows: Iterable[Row]) -> list[Partition]:
    """The (topic, partition) pairs of these rows, sorted: fence rows are locked in one order."""
    return sorted({(r.origin.topic, r.origin.partition) for r in rows})


def above(rows: list[Row], fences: dict[Partition, int]) -> list[Row]:
    """The rows of records at or past their partition's fence (not stored yet)."""
    return [r for r in rows
            if r.origin.offset >= fences.get((r.origin.topic, r.origin.partition), 0)]


def record_keys(rows: Iterable[Row]) -> list[RecordKey]:
    """The distinct idempotency keys of these rows' records, first seen first."""
    keys: dict[RecordKey, None] = {}
    for r in rows:
        o = r.origin
        if o.idempotency_key is not None:
            keys[(o.connector, o.idempotency_key, o.part)] = None
    return list(keys)


def first_of_fresh_keys(rows: list[Row], fresh: set[RecordKey]) -> list[Row]:
    """Rows of records without a key, or of the first record of a key recorded just now.

    Two records of one key in one batch (a request and its republished copy) are stored once:
    the first, in offset order.
    """
    owners: dict[RecordKey, tuple[str, int, int]] = {}
    kept = []
    for r in rows:
        o = r.origin
        if o.idempotency_key is None:
            kept.append(r)
            continue
        key = (o.connector, o.idempotency_key, o.part)
        if key in fresh:
            record = (o.topic, o.partition, o.offset)
            if owners.setdefault(key, record) == record:
                kept.append(r)
    return kept


def next_fences(rows: Iterable[Row]) -> list[tuple[str, int, int]]:
    """(topic, partition, next offset) once these rows' records are handled, sorted."""
    ends: dict[Partition, int] = {}
    for r in rows:
        o = r.origin
        tp = (o.topic, o.partition)
        if o.offset >= ends.get(tp, -1):
            ends[tp] = o.offset
    return [(t, p, end + 1) for (t, p), end in sorted(ends.items())]


def written(rows: Iterable[Row]) -> Counter:
    """Rows stored per request id."""
    return Counter(r.origin.request_id for r in rows)
