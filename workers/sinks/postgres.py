"""PostgreSQL sink: asyncpg, rows staged with COPY and merged with one INSERT ... ON CONFLICT."""

from __future__ import annotations

from collections import Counter

import asyncpg
import orjson

from schemas.structure import Structure
from workers.rows import Row, table_columns
from workers.sinks.base import WriteResult, check_columns, conflict_target, quote

# information_schema's spelling, which CREATE TABLE also accepts.
_TYPES = {"text": "text", "integer": "bigint", "number": "double precision",
          "boolean": "boolean", "timestamp": "timestamp with time zone", "date": "date",
          "json": "jsonb"}
_STAGE = "_sluice_stage"


def pg_type(kind: str) -> str:
    return _TYPES[kind]


async def _init_connection(conn: asyncpg.Connection) -> None:
    # binary jsonb is a version byte (1) and the JSON text; COPY needs the binary form
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + orjson.dumps(v),
                              decoder=lambda b: orjson.loads(b[1:]))


class PostgresSink:
    def __init__(self, url: str):
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._sql: dict[str, tuple[str, list[str]]] = {}

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4,
                                               init=_init_connection)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def prepare(self, structure: Structure) -> None:
        assert self._pool is not None
        table = structure.dataset.id
        columns = table_columns(structure)
        async with self._pool.acquire() as conn, conn.transaction():
            # one preparer at a time across worker processes
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table)
            rows = await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = $1", table)
            existing = {r["column_name"]: r["data_type"] for r in rows}
            if not existing:
                await conn.execute(self._create_sql(structure, columns))
            else:
                for name, kind in check_columns(table, existing, columns, pg_type):
                    await conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)} "
                                       f"{pg_type(kind)}")
            if not structure.key_column and not structure.event_column:
                await conn.execute(
                    f"CREATE UNIQUE INDEX IF NOT EXISTS {quote(table + '__idempotency')} ON "
                    f"{quote(table)} (_connector, _idempotency_key, _part, _index) "
                    "WHERE _idempotency_key IS NOT NULL")
        self._sql[table] = (self._merge_sql(structure, columns), [n for n, _ in columns])

    def _create_sql(self, structure: Structure, columns: list[tuple[str, str]]) -> str:
        defs = [f"{quote(n)} {pg_type(k)}" for n, k in columns]
        unique = ", ".join(quote(c) for c in conflict_target(structure))
        constraint = "PRIMARY KEY" if structure.key_column else "UNIQUE"
        return (f"CREATE TABLE IF NOT EXISTS {quote(structure.dataset.id)} "
                f"({', '.join(defs)}, {constraint} ({unique}))")

    def _merge_sql(self, structure: Structure, columns: list[tuple[str, str]]) -> str:
        table = quote(structure.dataset.id)
        names = ", ".join(quote(n) for n, _ in columns)
        sql = f"INSERT INTO {table} AS t ({names}) SELECT {names} FROM {_STAGE} "
        key = structure.key_column
        if key is None:
            sql += "ON CONFLICT DO NOTHING"
        else:
            updates = ", ".join(f"{quote(n)} = EXCLUDED.{quote(n)}" for n, _ in columns
                                if n != key)
            order = ("_received_at", "_partition", "_offset", "_index")
            sql += (f"ON CONFLICT ({quote(key)}) DO UPDATE SET {updates} WHERE "
                    f"({', '.join('EXCLUDED.' + c for c in order)}) > "
                    f"({', '.join('t.' + c for c in order)})")
        # per request, not per row: a batch of 500k rows returns a few thousand counts
        return (f"WITH merged AS ({sql} RETURNING _request_id) "
                "SELECT _request_id, count(*) AS n FROM merged GROUP BY _request_id")

    async def write(self, structure: Structure, rows: list[Row]) -> WriteResult:
        assert self._pool is not None
        table = structure.dataset.id
        sql, names = self._sql[table]
        records = [row.columns() for row in rows]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"CREATE TEMP TABLE {_STAGE} (LIKE {quote(table)}) "
                               "ON COMMIT DROP")
            await conn.copy_records_to_table(_STAGE, records=records, columns=names)
            returned = await conn.fetch(sql)
        return WriteResult(Counter({r["_request_id"]: r["n"] for r in returned}))
