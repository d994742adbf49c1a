"""What every sink offers, and the table plan they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.structure import Structure
from workers.rows import Row


class StorageSchemaError(RuntimeError):
    """The table and the dataset's schema disagree in a way that would lose data."""


class StorageBusy(RuntimeError):
    """A write the store refused for now (a deadlock, a serialization conflict, a lost or
    refused connection): nothing of it was committed, and the same batch may be retried."""


class StorageRefused(RuntimeError):
    """The store refused rows for what they hold (a constraint or trigger of the table, a
    value or a row it cannot keep): retrying them fails the same way. The worker then finds
    the refused rows (Sink.refusals) and dead-letters them, so the partition flows."""


class Probed(Exception):
    """Raised inside a probe's transaction (Sink.refusals) to roll back a write that went
    through."""


def described(exc: BaseException) -> str:
    """A store's error as the sinks report it: its type and message."""
    return f"{type(exc).__name__}: {exc}"


@dataclass
class WriteResult:
    """Rows that changed the table, per request id (None: records without one)."""

    written: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.written.values())


class TablePlans(ABC):
    """How a sink writes each table: ``_sql`` holds, per table, the plan (a tuple whose first
    item is the structure it was made from) of the structure prepared last; ``_plan`` makes
    one."""

    _sql: dict[str, tuple[Any, ...]]

    @abstractmethod
    def _plan(self, structure: Structure) -> tuple[Any, ...]:
        """The plan of ``structure``: each sink says how it writes a table."""

    def _statement(self, structure: Structure) -> Any:
        """How rows shaped by ``structure`` are written: the plan of the structure last
        prepared, or for rows shaped before a catalogue reload (a batch in flight, or a reload
        that failed at another dataset, so the worker keeps the catalogue it has) their own
        structure's, so each value goes to its own column (the table has them all: a reload
        only adds columns)."""
        prepared = self._sql[structure.dataset.id]
        return prepared if prepared[0] is structure else self._plan(structure)


class Sink(Protocol):
    async def start(self) -> None: ...

    async def prepare(self, structure: Structure) -> None:
        """Create the dataset's table, or add the columns a grown schema needs."""

    async def write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        """Write rows in one transaction, exactly once in effect: a record's rows all in one
        call, each partition's records in offset order (see fence.py). The rows are shaped
        by ``structure``, which may be older than the one prepared last (a batch shaped
        before a catalogue reload): they go to that structure's columns."""

    async def refusals(self, structure: Structure, rows: list[Row]) -> list[str | None]:
        """Why the store would refuse each row written alone (None: it would not); nothing
        is written. The failure path of a write that raised StorageRefused."""

    async def prune(self, now_ms: int) -> int:
        """Delete the Idempotency-Key records of the append-only tables prepared that decide
        nothing any more at ``now_ms`` (fence.prune_before); the number deleted."""

    async def close(self) -> None: ...


# The unique key of append-only tables created before offset fences (fence.py); a table that
# still has it keeps being written with INSERT ... ON CONFLICT DO NOTHING.
LEGACY_APPEND_KEY = ("_topic", "_partition", "_offset", "_index")


def conflict_target(structure: Structure) -> list[str] | None:
    """The columns whose uniqueness makes a repeated event a no-op; None for an append-only
    table, which offset fences keep exactly once instead (see fence.py)."""
    if structure.key_column:
        return [structure.key_column]
    if structure.event_column:
        return [structure.event_column]
    return None


def legacy_idempotency_index_sql(table: str) -> str:
    """The per-row Idempotency-Key index of append-only tables created before fences."""
    return (f"CREATE UNIQUE INDEX IF NOT EXISTS {quote(table + '__idempotency')} ON "
            f"{quote(table)} (_connector, _idempotency_key, _part, _index) "
            "WHERE _idempotency_key IS NOT NULL")


def create_table_sql(structure: Structure, columns: list[tuple[str, str]], type_of) -> str:
    defs = [f"{quote(n)} {type_of(k)}" for n, k in columns]
    target = conflict_target(structure)
    if target is not None:
        constraint = "PRIMARY KEY" if structure.key_column else "UNIQUE"
        defs.append(f"{constraint} ({', '.join(quote(c) for c in target)})")
    return f"CREATE TABLE IF NOT EXISTS {quote(structure.dataset.id)} ({', '.join(defs)})"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def check_columns(table: str, existing: dict[str, str], wanted: list[tuple[str, str]],
                  type_of) -> list[tuple[str, str]]:
    """Columns to add; StorageSchemaError when an existing column has another type."""
    missing = []
    for name, kind in wanted:
        have = existing.get(name)
        if have is None:
            missing.append((name, kind))
        elif have.lower() != type_of(kind).lower():
            raise StorageSchemaError(
                f"table {table}: column {name} is {have} but the schema now makes it "
                f"{type_of(kind)}; migrate the table (or rename the field) before restarting")
    return missing
