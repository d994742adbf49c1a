"""Rows on their way to storage: shaped values plus where each event came from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.structure import META_COLUMNS, Structure


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one event came from: its record's metadata and its place in the record."""

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
    index: int

    def values(self) -> tuple:
        return (self.request_id, self.connector, self.received_at, self.session_id,
                self.sync_id, self.idempotency_key, self.part, self.topic, self.partition,
                self.offset, self.index)

    @property
    def order(self) -> tuple:
        """Last-writer-wins order: receive time, then position (deterministic on ties)."""
        return (self.received_at, self.partition, self.offset, self.index)


@dataclass(frozen=True, slots=True)
class Row:
    data: dict[str, Any]
    origin: Origin


def table_columns(structure: Structure) -> list[tuple[str, str]]:
    """(name, kind) of every column of a dataset's table, in order."""
    return structure.data_columns + [(m.name, m.kind) for m in META_COLUMNS]


def reduce_latest(structure: Structure, rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """For item-key datasets: the newest row per item key, and the rows it supersedes.

    A batch may carry several writes of one item; the store can apply only one per statement.
    """
    key = structure.key_column
    if key is None:
        return rows, []
    latest: dict[Any, Row] = {}
    superseded: list[Row] = []
    for row in rows:
        k = row.data[key]
        current = latest.get(k)
        if current is None or row.origin.order > current.origin.order:
            if current is not None:
                superseded.append(current)
            latest[k] = row
        else:
            superseded.append(row)
    return list(latest.values()), superseded
