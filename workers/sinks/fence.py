"""Exactly once for append-only tables: offset fences and record keys, stored with the rows.

An append-only table (no item key, no event id) has no natural key. Rather than a unique index
over (topic, partition, offset, position), which every row pays for on insert, the store keeps
two small tables, written in the same transaction as the rows:

- ``_sluice_offsets``: per (table, topic, partition), the first offset not yet stored (the
  fence). A redelivered record lies below it and is skipped. Writers lock the fence rows they
  touch, so a worker that lost its partitions in a rebalance waits for the new owner's write
  and then sees its progress.
- ``_sluice_idempotency``: per (table, connector, Idempotency-Key, part), the receive time
  (epoch ms) of the request stored last with that key. A request published twice (retried
  after its Redis claim was lost) is stored once: its copies arrive within the gateway's
  retention window (SLUICE_IDEMPOTENCY_TTL_S). After that window the gateway has forgotten
  the key and a client may send it again with new data (Stripe's semantics): a record
  received more than a window after the recorded time is that new request, stored, and the
  recorded time moves to it (``KeyedRecords``).

The rows then go into the table as they are (COPY in PostgreSQL) with no per-row check. This
relies on what the consumer does anyway: every row of a record comes in one write, and a
partition's records come in offset order.

The planning here is pure and per record (``workers.rows.runs``); each sink runs the
statements in its own dialect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from workers.rows import Origin, Run

OFFSETS_TABLE = "_sluice_offsets"
KEYS_TABLE = "_sluice_idempotency"

Partition = tuple[str, int]
RecordKey = tuple[str, str, int]  # connector, idempotency key, part
Coordinates = tuple[str, int, int]  # topic, partition, offset: one record

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def partitions(batch: Iterable[Run]) -> list[Partition]:
    """The (topic, partition) pairs of the batch, sorted: fence rows are locked in one order."""
    return sorted({(r.origin.topic, r.origin.partition) for r in batch})


def above(batch: list[Run], fences: dict[Partition, int]) -> list[Run]:
    """The records at or past their partition's fence (not stored yet)."""
    return [r for r in batch
            if r.origin.offset >= fences.get((r.origin.topic, r.origin.partition), 0)]


def received_ms(origin: Origin) -> int:
    """The record's receive time in epoch milliseconds (exact: integer arithmetic), as
    KeyedRecords takes it."""
    return (origin.received_at - _EPOCH) // _MS


class KeyedRecords:
    """Which records of a batch with an Idempotency-Key are requests to store.

    The store records, per key, the receive time R of the request it stored last. A record of
    the key received at t is a copy of that request when t - R <= the window (skipped), and
    a new request when the key is not recorded or t - R > the window (stored, and R becomes
    t). The store decides in one statement per round, a key at most once per statement
    (``probes``, then ``recorded`` with the keys it took as new): one round, unless a key has
    several records in the batch (a request and its copy, or a key reused a window later
    while the workers lag), which it takes in receive-time order (then batch order), over
    more rounds only while one may still be new.
    """

    def __init__(self, batch: Iterable[Run], window_ms: int):
        self.window_ms = window_ms
        self.kept: set[Coordinates] = set()
        # per key: (receive ms, coordinates) of its records not decided yet, the earliest first
        pending: dict[RecordKey, list[tuple[int, Coordinates]]] = {}
        several = False
        for r in batch:
            o = r.origin
            if o.idempotency_key is not None:
                record = ((o.received_at - _EPOCH) // _MS, (o.topic, o.partition, o.offset))
                records = pending.get(key := (o.connector, o.idempotency_key, o.part))
                if records is None:
                    pending[key] = [record]
                else:
                    records.append(record)
                    several = True
        if several:
            for records in pending.values():
                records.sort(key=lambda rec: rec[0])  # stable: batch order on ties
        self._pending = pending

    def probes(self) -> list[tuple[str, str, int, int]]:
        """(connector, key, part, receive ms) of each undecided key's earliest record; empty
        once all are decided. (Unsorted: a store that locks keys sorts them itself.)"""
        return [(*key, records[0][0]) for key, records in self._pending.items()]

    def recorded(self, new: Iterable[RecordKey]) -> None:
        """The store took the probes of ``new`` as new requests (recorded or moved forward),
        the others as copies."""
        new = set(new)
        kept = self.kept
        pending = {}
        for key, records in self._pending.items():
            ms, first = records[0]
            if key in new:
                kept.add(first)
                ms += self.window_ms  # R is now ms: a later record is new past the window
            # else R >= ms - window: only a later record may be more than a window past it
            if len(records) > 1 and (rest := [rec for rec in records[1:] if rec[0] > ms]):
                pending[key] = rest
        self._pending = pending

    def stored(self, batch: list[Run]) -> list[Run]:
        """The records to store: those without a key, and the new requests."""
        kept = self.kept
        return [r for r in batch if r.origin.idempotency_key is None
                or (r.origin.topic, r.origin.partition, r.origin.offset) in kept]


def prune_before(now_ms: int, window_ms: int) -> int:
    """Receive times (epoch ms) below which a recorded key decides nothing any more.

    A key recorded at R decides only records received up to R + window. Those are stored by
    now unless the workers lag by more than now - R - window: pruning keys older than two
    windows keeps a copy processed up to a window late (a day by default) stored once."""
    return now_ms - 2 * window_ms


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
