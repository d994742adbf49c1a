"""SQLite sink: the embedded default. One connection on one thread; a batch is one transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson

from schemas.structure import Structure
from workers.rows import Row, table_columns
from workers.sinks.base import WriteResult, check_columns, conflict_target, quote

_TYPES = {"text": "TEXT", "integer": "INTEGER", "number": "REAL", "boolean": "INTEGER",
          "timestamp": "TEXT", "date": "TEXT", "json": "TEXT"}


def sqlite_type(kind: str) -> str:
    return _TYPES[kind]


def timestamp_text(value: datetime) -> str:
    """Fixed-width UTC text, so comparing text compares times."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _register_adapters() -> None:
    """How our values are bound, done by sqlite3 itself while binding (no per-row Python
    pass): times as fixed-width UTC text, dates as ISO text, JSON values as JSON text.
    (bool binds as 0/1 natively.)"""
    sqlite3.register_adapter(datetime, timestamp_text)
    sqlite3.register_adapter(date, date.isoformat)
    sqlite3.register_adapter(dict, _json_text)
    sqlite3.register_adapter(list, _json_text)


def path_of(url: str) -> Path:
    parsed = urlparse(url)
    return Path(parsed.netloc + parsed.path if parsed.netloc else parsed.path)


class SqliteSink:
    def __init__(self, url: str):
        self.path = path_of(url)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._sql: dict[str, str] = {}
        _register_adapters()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            conn.execute("PRAGMA synchronous=NORMAL")
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
        with self._conn:
            if not existing:
                self._conn.execute(self._create_sql(structure, columns))
            else:
                for name, kind in check_columns(table, existing, columns, sqlite_type):
                    self._conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)} "
                                       f"{sqlite_type(kind)}")
            if not structure.key_column and not structure.event_column:
                self._conn.execute(
                    f"CREATE UNIQUE INDEX IF NOT EXISTS {quote(table + '__idempotency')} ON "
                    f"{quote(table)} (_connector, _idempotency_key, _part, _index) "
                    "WHERE _idempotency_key IS NOT NULL")
        self._sql[table] = self._insert_sql(structure, columns)

    def _create_sql(self, structure: Structure, columns: list[tuple[str, str]]) -> str:
        defs = [f"{quote(n)} {sqlite_type(k)}" for n, k in columns]
        unique = ", ".join(quote(c) for c in conflict_target(structure))
        constraint = "PRIMARY KEY" if structure.key_column else "UNIQUE"
        return (f"CREATE TABLE IF NOT EXISTS {quote(structure.dataset.id)} "
                f"({', '.join(defs)}, {constraint} ({unique}))")

    def _insert_sql(self, structure: Structure, columns: list[tuple[str, str]]) -> str:
        table = quote(structure.dataset.id)
        names = ", ".join(quote(n) for n, _ in columns)
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {table} ({names}) VALUES ({marks}) "
        key = structure.key_column
        if key is None:
            return sql + "ON CONFLICT DO NOTHING"
        updates = ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n, _ in columns if n != key)
        order = "_received_at, _partition, _offset, _index"
        newer = ", ".join(f"excluded.{c.strip()}" for c in order.split(","))
        current = ", ".join(f"{table}.{c.strip()}" for c in order.split(","))
        return (sql + f"ON CONFLICT ({quote(key)}) DO UPDATE SET {updates} "
                f"WHERE ({newer}) > ({current})")

    async def write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        return await self._run(self._write, structure, rows)

    def _write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        assert self._conn is not None
        sql = self._sql[structure.dataset.id]
        by_request: dict[str | None, list[tuple]] = {}
        for row in rows:
            by_request.setdefault(row.origin.request_id, []).append(row.columns())
        written: Counter = Counter()
        conn = self._conn
        with conn:
            for request_id, values in by_request.items():
                # rows that took: inserted or replaced (a skipped conflict changes nothing)
                before = conn.total_changes
                conn.executemany(sql, values)
                if conn.total_changes > before:
                    written[request_id] += conn.total_changes - before
        return WriteResult(written)
