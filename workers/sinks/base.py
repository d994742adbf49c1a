"""What every sink offers, and the table plan they share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from schemas.structure import Structure
from workers.rows import Row


class StorageSchemaError(RuntimeError):
    """The table and the dataset's schema disagree in a way that would lose data."""


@dataclass
class WriteResult:
    """Rows that changed the table, per request id (None: records without one)."""

    written: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.written.values())


class Sink(Protocol):
    async def start(self) -> None: ...

    async def prepare(self, structure: Structure) -> None:
        """Create the dataset's table, or add the columns a grown schema needs."""

    async def write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        """Write rows in one transaction, exactly once in effect (see the module docs)."""

    async def close(self) -> None: ...


def conflict_target(structure: Structure) -> list[str]:
    """The columns whose uniqueness makes a redelivered event a no-op."""
    if structure.key_column:
        return [structure.key_column]
    if structure.event_column:
        return [structure.event_column]
    return ["_topic", "_partition", "_offset", "_index"]


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
