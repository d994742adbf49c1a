"""SQLite sink: the embedded default. One connection on one thread; a batch is one transaction.

Append-only tables are kept exactly once by offset fences (fence.py), tables with a natural key
by INSERT ... ON CONFLICT.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from pathlib import Path
from urllib.parse import urlparse

from schemas.structure import Structure
from workers.rows import Row, runs, table_columns, table_rows
from workers.sinks import fence
from workers.sinks.base import (
    LEGACY_APPEND_KEY,
    Probed,
    StorageBusy,
    StorageRefused,
    StorageSchemaError,
    TablePlans,
    WriteResult,
    check_columns,
    conflict_target,
    create_table_sql,
    described,
    legacy_idempotency_index_sql,
    quote,
)

_REFUSED = (sqlite3.IntegrityError, sqlite3.DataError)


_TYPES = {"text": "TEXT", "integer": "INTEGER", "number": "REAL", "boolean": "INTEGER",
          "timestamp": "TEXT", "date": "TEXT", "json": "TEXT"}


_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
# a key's receive time when a writer gives none (one of an earlier version): the time it is
# recorded, which is later (a copy stays one for at least a window)
_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
_FENCE_TABLES = (
    f"CREATE TABLE IF NOT EXISTS {fence.OFFSETS_TABLE} (table_name TEXT NOT NULL, "
    "topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, "
    "PRIMARY KEY (table_name, topic, partition))",
    f"CREATE TABLE IF NOT EXISTS {fence.KEYS_TABLE} (table_name TEXT NOT NULL, "
    "connector TEXT NOT NULL, idempotency_key TEXT NOT NULL, part INTEGER NOT NULL, "
    f"stored_at TEXT NOT NULL DEFAULT ({_NOW}), received_ms INTEGER NOT NULL DEFAULT "
    f"({_NOW_MS}), "
    "PRIMARY KEY (table_name, connector, idempotency_key, part))",
)
# for pruning (fence.prune_before); created on the tables of earlier versions too
_KEYS_BY_TIME = (f"CREATE INDEX IF NOT EXISTS {fence.KEYS_TABLE}_received ON "
                 f"{fence.KEYS_TABLE} (table_name, received_ms)")
# a new request (fence.KeyedRecords): its key not recorded, or recorded over a window before
_RECORD_KEY = (
    f"INSERT INTO {fence.KEYS_TABLE} (table_name, connector, idempotency_key, part, "
    "received_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (table_name, connector, idempotency_key, "
    f"part) DO UPDATE SET received_ms = excluded.received_ms, stored_at = {_NOW} "
    "WHERE excluded.received_ms - received_ms > ?")
_PRUNE = (f"DELETE FROM {fence.KEYS_TABLE} WHERE rowid IN (SELECT rowid FROM {fence.KEYS_TABLE} "
          "WHERE table_name = ? AND received_ms < ? LIMIT ?)")


def sqlite_type(kind: str) -> str:
    return _TYPES[kind]


def timestamp_text(value: datetime) -> str:
    """Fixed-width UTC text, so comparing text compares times (the wall-clock fields: the
    workers' times are UTC). Not strftime: 0.7 against 1.9 us, and strftime does not pad
    years before 1000 on glibc."""
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031 -- faster than f-strings
        value.year, value.month, value.day, value.hour, value.minute, value.second,
        value.microsecond)


def _register_adapters() -> None:
    """How our values are bound, done by sqlite3 itself while binding (no per-row Python
    pass): times as fixed-width UTC text, dates as ISO text. (bool binds as 0/1 natively;
    a json column's value comes as its JSON text already, schemas.structure.to_json.)"""
    sqlite3.register_adapter(datetime, timestamp_text)
    sqlite3.register_adapter(date, date.isoformat)


def path_of(url: str) -> Path:
    parsed = urlparse(url)
    return Path(parsed.netloc + parsed.path if parsed.netloc else parsed.path)


class SqliteSink(TablePlans):
    def __init__(self, url: str, key_window_s: int):
        self.path = path_of(url)
        self._window_ms = key_window_s * 1000  # fence.KeyedRecords
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        # per table: whether it has the unique key of tables created before offset fences
        self._legacy: dict[str, bool] = {}
        # per table: the structure last prepared, the insert statement of its rows, and
        # whether offset fences keep the table exactly once (_statement)
        self._sql: dict[str, tuple[Structure, str, bool]] = {}
        self._keys_ready = False  # the fence tables exist in their current form
        _register_adapters()

    async def _run(self, fn, *args):
        """``fn(*args)`` on the sink's thread. Another writer holding the file past the busy
        timeout (nothing of ``fn`` committed) raises StorageBusy, which the worker retries."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            # extended codes keep the primary code in their low byte
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StorageBusy(str(exc)) from exc
            raise
        except _REFUSED as exc:  # a constraint or trigger of the table, a value too big
            raise StorageRefused(described(exc)) from exc

    async def start(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            # FULL: in WAL mode NORMAL lets a committed transaction roll back after a power
            # loss or OS crash, and the offsets after it are already committed in Kafka
            conn.execute("PRAGMA synchronous=FULL")
            return conn

        self._conn = await self._run(connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def prepare(self, structure: Structure) -> None:
        await self._run(self._prepare, structure)

    def _prepare(self, structure: Structure) -> None:
        assert self._conn is not None
        table = structure.dataset.id
        columns = table_columns(structure)
        existing = {r[1]: r[2] for r in self._conn.execute(f"PRAGMA table_info({quote(table)})")}
        _check_case(table, existing, columns)
        with self._conn:
            if not existing:
                self._conn.execute(create_table_sql(structure, columns, sqlite_type))
            else:
                for name, kind in check_columns(table, existing, columns, sqlite_type):
                    self._conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)} "
                                       f"{sqlite_type(kind)}")
            legacy = False
            if conflict_target(structure) is None:
                legacy = self._has_unique(table, LEGACY_APPEND_KEY)
                if legacy:
                    # created before fences: its unique keys keep it exactly once
                    self._conn.execute(legacy_idempotency_index_sql(table))
                elif not self._keys_ready:
                    self._fence_tables()
        self._legacy[table] = legacy
        self._sql[table] = self._plan(structure)
        self._keys_ready = self._keys_ready or self._sql[table][2]

    def _plan(self, structure: Structure) -> tuple[Structure, str, bool]:
        fenced = (conflict_target(structure) is None
                  and not self._legacy[structure.dataset.id])
        sql = self._insert_sql(structure, table_columns(structure), fenced)
        return structure, sql, fenced

    def _fence_tables(self) -> None:
        """Create the fence tables, or bring those of an earlier version up to date: the keys
        it recorded get the time of this migration as their receive time, so they stay
        copies for one window (0 would let a late copy through)."""
        assert self._conn is not None
        for sql in _FENCE_TABLES:
            self._conn.execute(sql)
        have = {r[1] for r in self._conn.execute(f"PRAGMA table_info({fence.KEYS_TABLE})")}
        if "received_ms" not in have:
            # a constant default (SQLite adds no other) fills the rows without rewriting
            # them; it stays in the schema, and this version's inserts give the value
            self._conn.execute(f"ALTER TABLE {fence.KEYS_TABLE} ADD COLUMN received_ms "
                               f"INTEGER NOT NULL DEFAULT {time.time_ns() // 1_000_000}")
        self._conn.execute(_KEYS_BY_TIME)

    def _has_unique(self, table: str, columns: tuple[str, ...]) -> bool:
        """Is there a unique index over exactly these columns, in this order?"""
        assert self._conn is not None
        for _, name, unique, *_ in self._conn.execute(f"PRAGMA index_list({quote(table)})"):
            info = self._conn.execute(f"PRAGMA index_info({quote(name)})").fetchall()
            if unique and tuple(r[2] for r in sorted(info)) == columns:
                return True
        return False

    def _insert_sql(self, structure: Structure, columns: list[tuple[str, str]],
                    fenced: bool) -> str:
        table = quote(structure.dataset.id)
        names = ", ".join(quote(n) for n, _ in columns)
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"
        if fenced:
            return sql
        key = structure.key_column
        if key is None:
            return sql + " ON CONFLICT DO NOTHING"
        updates = ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n, _ in columns if n != key)
        order = "_received_at, _partition, _offset, _index"
        newer = ", ".join(f"excluded.{c.strip()}" for c in order.split(","))
        current = ", ".join(f"{table}.{c.strip()}" for c in order.split(","))
        return (sql + f" ON CONFLICT ({quote(key)}) DO UPDATE SET {updates} "
                f"WHERE ({newer}) > ({current})")

    async def write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        return await self._run(self._write, structure, rows)

    def _write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        assert self._conn is not None
        with self._conn:  # one transaction: committed, or rolled back on an error
            return self._write_in(structure, rows)

    def _write_in(self, structure: Structure, rows: list[Row]) -> WriteResult:
        assert self._conn is not None
        table = structure.dataset.id
        _, sql, fenced = self._statement(structure)
        if fenced:
            return WriteResult(fence.written(self._append(table, sql, rows)))
        by_request: dict[str | None, list[tuple]] = {}
        for run in runs(rows):
            by_request.setdefault(run.origin.request_id, []).extend(
                table_rows(rows, (run,), timestamp_text))
        written: Counter = Counter()
        conn = self._conn
        for request_id, values in by_request.items():
            # rows that took: inserted or replaced (a skipped conflict changes nothing)
            before = conn.total_changes
            conn.executemany(sql, values)
            if conn.total_changes > before:
                written[request_id] += conn.total_changes - before
        return WriteResult(written)

    async def refusals(self, structure: Structure, rows: list[Row]) -> list[str | None]:
        return await self._run(self._refusals, structure, rows)

    def _refusals(self, structure: Structure, rows: list[Row]) -> list[str | None]:
        assert self._conn is not None
        out: list[str | None] = []
        for row in rows:  # each alone, in a transaction rolled back
            try:
                with self._conn:
                    self._write_in(structure, [row])
                    raise Probed
            except Probed:
                out.append(None)
            except _REFUSED as exc:
                out.append(described(exc))
        return out

    async def prune(self, now_ms: int, chunk: int = 10_000) -> int:
        """Delete the Idempotency-Key records of this sink's append-only tables that decide
        nothing any more (fence.prune_before), ``chunk`` rows per transaction: a writer
        waits for one chunk at most. The rows deleted."""
        before = fence.prune_before(now_ms, self._window_ms)
        deleted = 0
        for table in [table for table, (_, _, fenced) in list(self._sql.items()) if fenced]:
            while True:
                n = await self._run(self._prune, table, before, chunk)
                deleted += n
                if n < chunk:
                    break
        return deleted

    def _prune(self, table: str, before: int, chunk: int) -> int:
        assert self._conn is not None
        with self._conn:
            return self._conn.execute(_PRUNE, (table, before, chunk)).rowcount

    def _append(self, table: str, sql: str, rows: list[Row]) -> list[fence.Run]:
        """Insert the rows not stored yet, behind the offset fences; the records inserted."""
        assert self._conn is not None
        conn = self._conn
        batch = runs(rows)
        parts = fence.partitions(batch)
        # the first write takes SQLite's one write lock: the fences read below stay current
        conn.executemany(f"INSERT OR IGNORE INTO {fence.OFFSETS_TABLE} "
                         "(table_name, topic, partition, next_offset) VALUES (?, ?, ?, 0)",
                         [(table, t, p) for t, p in parts])
        fences = {(t, p): conn.execute(
            f"SELECT next_offset FROM {fence.OFFSETS_TABLE} WHERE table_name = ? AND topic = ? "
            "AND partition = ?", (table, t, p)).fetchone()[0] for t, p in parts}
        fresh = fence.above(batch, fences)
        keyed = fence.KeyedRecords(fresh, self._window_ms)
        if probes := keyed.probes():
            while probes:  # one round, unless a key has several records in the batch
                keyed.recorded([(c, k, p) for c, k, p, ms in probes if conn.execute(
                    _RECORD_KEY, (table, c, k, p, ms, self._window_ms)).rowcount])
                probes = keyed.probes()
            fresh = keyed.stored(fresh)
        conn.executemany(sql, table_rows(rows, fresh, timestamp_text))
        conn.executemany(f"UPDATE {fence.OFFSETS_TABLE} SET next_offset = ? WHERE "
                         "table_name = ? AND topic = ? AND partition = ? AND next_offset < ?",
                         [(n, table, t, p, n) for t, p, n in fence.next_fences(batch)])
        return fresh


def _check_case(table: str, existing: dict[str, str], wanted: list[tuple[str, str]]) -> None:
    """StorageSchemaError for two columns whose names differ only in ASCII case, which SQLite
    takes for one name (PostgreSQL, quoting them, keeps both): both wanted, or one wanted and
    the other in the table (a field renamed so)."""
    seen = {name.encode().lower(): name for name in existing}
    for name, _ in wanted:
        other = seen.setdefault(name.encode().lower(), name)
        if other != name:
            raise StorageSchemaError(
                f"table {table}: columns {other} and {name} differ only in case, which SQLite "
                "does not tell apart; rename one of the fields")
