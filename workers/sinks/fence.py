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

The planning here is pure and per record (``workers.rows.runs``); each sink runs the
statements in its own dialect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from workers.rows import Run

OFFSETS_TABLE = "_sluice_offsets"
KEYS_TABLE = "_sluice_idempotency"

Partition = tuple[str, int]
RecordKey = tuple[str, str, int]  # connector, idempotency key, part


def partitions(batch: Iterable[Run]) -> list[Partition]:
    """The (topic, partition) pairs of the batch, sorted: fence rows are locked in one order."""
    return sorted({(r.origin.topic, r.origin.partition) for r in batch})


def above(batch: list[Run], fences: dict[Partition, int]) -> list[Run]:
    """The records at or past their partition's fence (not stored yet)."""
    return [r for r in batch
            if r.origin.offset >= fences.get((r.origin.topic, r.origin.partition), 0)]


def record_keys(batch: Iterable[Run]) -> list[RecordKey]:
    """The distinct idempotency keys of the batch's records, first seen first."""
    keys: dict[RecordKey, None] = {}
    for r in batch:
        o = r.origin
        if o.idempotency_key is not None:
            keys[(o.connector, o.idempotency_key, o.part)] = None
    return list(keys)


def first_of_fresh_keys(batch: list[Run], fresh: set[RecordKey]) -> list[Run]:
    """Records without a key, or the first record of a key recorded just now.

    Two records of one key in one batch (a request and its republished copy) are stored once:
    the first, in offset order.
    """
    owners: dict[RecordKey, tuple[str, int, int]] = {}
    kept = []
    for r in batch:
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


def next_fences(batch: Iterable[Run]) -> list[tuple[str, int, int]]:
    """(topic, partition, next offset) once the batch's records are handled, sorted."""
    ends: dict[Partition, int] = {}
    for r in batch:
        o = r.origin
        tp = (o.topic, o.partition)
        if o.offset >= ends.get(tp, -1):
            ends[tp] = o.offset
    return [(t, p, end + 1) for (t, p), end in sorted(ends.items())]


def written(batch: Iterable[Run]) -> Counter:
    """Rows per request id."""
    counts: Counter = Counter()
    for r in batch:
        counts[r.origin.request_id] += r.end - r.start
    return counts
