"""Rows on their way to storage: shaped values plus where each event came from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.columns import META_COLUMNS
from schemas.structure import Structure


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record came from: its metadata, shared by every event of the record."""

    request_id: str | None
    connector: str
    received_at: datetime
    session_id: str | None
    sync_id: str | None
    idempotency_key: str | None
    part: int
    topic: str
    partition: int
    offset: int

    def meta_with(self, received_at: Any) -> tuple:
        """The metadata columns but the last, with the receive time in a store's own form."""
        return (self.request_id, self.connector, received_at, self.session_id, self.sync_id,
                self.idempotency_key, self.part, self.topic, self.partition, self.offset)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, per event
class Row:
    """One event shaped for storage: values in the structure's ``data_names`` order."""

    values: tuple
    origin: Origin
    index: int  # the event's position in its record

    @property
    def order(self) -> tuple:
        """Last-writer-wins order: receive time, then position (deterministic on ties)."""
        o = self.origin
        return (o.received_at, o.partition, o.offset, self.index)


@dataclass(slots=True)
class Run:
    """Adjacent rows of one record: ``rows[start:end]`` of a batch, and their origin."""

    origin: Origin
    start: int
    end: int


def runs(rows: list[Row]) -> list[Run]:
    """A batch's rows as runs sharing one origin, so per-record work is done per record (a
    record's rows are adjacent and share their Origin object: one identity test per row)."""
    out: list[Run] = []
    last = None
    for i, row in enumerate(rows):
        if row.origin is not last:
            last = row.origin
            if out:
                out[-1].end = i
            out.append(Run(last, i, len(rows)))
    return out


def table_rows(rows: list[Row], batch: Iterable[Run],
               received_at: Callable[[datetime], Any]) -> list[tuple]:
    """Every column of the table rows of these records, in table order: the row's values, its
    record's metadata, its index. A record's metadata is built once for all its rows, with
    its receive time already in the store's form (``received_at``): one conversion per
    record, not per row."""
    return [row.values + meta + (row.index,)  # tuple concatenation: the fastest way
            for run in batch
            for meta in (run.origin.meta_with(received_at(run.origin.received_at)),)
            for row in rows[run.start:run.end]]


def table_columns(structure: Structure) -> list[tuple[str, str]]:
    """(name, kind) of every column of a dataset's table, in order."""
    return structure.data_columns + [(m.name, m.kind) for m in META_COLUMNS]


def reduce_latest(structure: Structure, rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """For item-key datasets: the newest row per item key, and the rows it supersedes.

    A batch may carry several writes of one item; the store can apply only one per statement.
    """
    key = structure.key_index
    if key is None:
        return rows, []
    latest: dict[Any, Row] = {}
    superseded: list[Row] = []
    for row in rows:
        k = row.values[key]
        current = latest.get(k)
        if current is None or row.order > current.order:
            if current is not None:
                superseded.append(current)
            latest[k] = row
        else:
            superseded.append(row)
    return list(latest.values()), superseded
