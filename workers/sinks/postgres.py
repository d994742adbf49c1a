"""PostgreSQL sink: asyncpg. Append-only tables take rows by COPY behind offset fences
(fence.py); tables with a natural key stage rows with COPY and merge them with one
INSERT ... ON CONFLICT."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone

import asyncpg
import orjson

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

# information_schema's spelling, which CREATE TABLE also accepts.
_TYPES = {"text": "text", "integer": "bigint", "number": "double precision",
          "boolean": "boolean", "timestamp": "timestamp with time zone", "date": "date",
          "json": "jsonb"}
_STAGE = "_sluice_stage"
# a key's receive time when a writer gives none (one of an earlier version, in a rolling
# upgrade): the time it is recorded, which is later (a copy stays one for at least a window);
# and the time of the migration for the keys recorded before there was this column
_NOW_MS = "(extract(epoch FROM now()) * 1000)::bigint"
_FENCE_TABLES = (
    f'CREATE TABLE IF NOT EXISTS {fence.OFFSETS_TABLE} (table_name text NOT NULL, '
    'topic text NOT NULL, "partition" integer NOT NULL, next_offset bigint NOT NULL, '
    'PRIMARY KEY (table_name, topic, "partition"))',
    f"CREATE TABLE IF NOT EXISTS {fence.KEYS_TABLE} (table_name text NOT NULL, "
    "connector text NOT NULL, idempotency_key text NOT NULL, part integer NOT NULL, "
    "stored_at timestamp with time zone NOT NULL DEFAULT now(), "
    f"received_ms bigint NOT NULL DEFAULT {_NOW_MS}, "
    "PRIMARY KEY (table_name, connector, idempotency_key, part))",
)
# for pruning (fence.prune_before); created on the tables of earlier versions too
_KEYS_BY_TIME = (f"CREATE INDEX IF NOT EXISTS {fence.KEYS_TABLE}_received ON "
                 f"{fence.KEYS_TABLE} (table_name, received_ms)")
_KEYS_MIGRATED = (
    "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
    f"current_schema() AND table_name = '{fence.KEYS_TABLE}' AND column_name = 'received_ms') "
    f"AND to_regclass('{fence.KEYS_TABLE}_received') IS NOT NULL")
_NEW_FENCES = (
    f'INSERT INTO {fence.OFFSETS_TABLE} (table_name, topic, "partition", next_offset) '
    "SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int[]) AS u(t, p) ORDER BY t, p "
    "ON CONFLICT DO NOTHING")
_LOCK_FENCES = (
    f'SELECT topic, "partition", next_offset FROM {fence.OFFSETS_TABLE} WHERE table_name = $1 '
    'AND (topic, "partition") IN (SELECT t, p FROM unnest($2::text[], $3::int[]) AS u(t, p)) '
    'ORDER BY topic, "partition" FOR UPDATE')
# the new requests (fence.KeyedRecords): keys not recorded, or recorded over a window ($6)
# before. A key's row is locked either way (DO UPDATE locks before it checks the WHERE), so a
# later round of the batch takes no new lock.
_RECORD_KEYS = (
    f"INSERT INTO {fence.KEYS_TABLE} AS i (table_name, connector, idempotency_key, part, "
    "received_ms) SELECT $1, c, k, p, r FROM unnest($2::text[], $3::text[], $4::int[], "
    "$5::bigint[]) AS u(c, k, p, r) "
    "ORDER BY c, k, p "  # one lock order for workers recording the same keys (retries)
    "ON CONFLICT (table_name, connector, idempotency_key, part) DO UPDATE SET "
    "received_ms = EXCLUDED.received_ms, stored_at = now() "
    "WHERE EXCLUDED.received_ms - i.received_ms > $6 "
    "RETURNING connector, idempotency_key, part")
_PRUNE = (f"DELETE FROM {fence.KEYS_TABLE} WHERE ctid = ANY(ARRAY(SELECT ctid FROM "
          f"{fence.KEYS_TABLE} WHERE table_name = $1 AND received_ms < $2 LIMIT $3))")
_ADVANCE_FENCES = (
    f"UPDATE {fence.OFFSETS_TABLE} AS f SET next_offset = u.n "
    "FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(t, p, n) "
    'WHERE f.table_name = $1 AND f.topic = u.t AND f."partition" = u.p AND u.n > f.next_offset')
# Is there a unique index over exactly these columns, in this order?
_HAS_UNIQUE = (
    "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass($1) "
    "AND i.indisunique AND ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) "
    "WITH ORDINALITY AS k(n, o) JOIN pg_attribute a ON a.attrelid = i.indrelid "
    "AND a.attnum = k.n ORDER BY k.o) = $2::text[])")


# Refusals that leave nothing committed and pass: deadlocks and serialization failures
# (SQLSTATE class 40), lost or refused connections (08), a server shutting down or starting (57)
_BUSY = (asyncpg.TransactionRollbackError, asyncpg.PostgresConnectionError,
         asyncpg.ConnectionDoesNotExistError, asyncpg.OperatorInterventionError)


# SQL states 22 (data exception), 23 (integrity constraint violation), 54 (program limit
# exceeded: a row too big): what a row holds, not the store's state
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
            asyncpg.ProgramLimitExceededError)


def _busy(exc: Exception) -> StorageBusy:
    return StorageBusy(described(exc))


def pg_type(kind: str) -> str:
    return _TYPES[kind]


# timestamptz on the wire: microseconds since 2000-01-01 UTC; asyncpg also writes the first
# and last instants Python can hold (0001-01-01, 9999-12-31 23:59:59.999999 UTC) as -infinity
# and infinity, and reads the infinities back as naive datetime.min and datetime.max
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_INFINITY, _PG_NEGATIVE_INFINITY = 2**63 - 1, -(2**63)
_LAST_MICROS = (datetime.max.replace(tzinfo=UTC) - _PG_EPOCH) // timedelta(microseconds=1)
_FIRST_MICROS = (datetime.min.replace(tzinfo=UTC) - _PG_EPOCH) // timedelta(microseconds=1)


def timestamptz_to_pg(value: datetime | date | tuple[int]) -> tuple[int]:
    """A datetime as timestamptz in asyncpg's tuple format, with the result of asyncpg's own
    encoder (naive means local time, a date is local midnight) but without its per-value
    astimezone(): a COPY row with two timestamps costs 1.6 -> 0.9 us to encode, with the
    receive time converted once per record (workers.rows.table_rows; a tuple here is that)."""
    if type(value) is tuple:
        return value
    if type(value) is not datetime:
        if not isinstance(value, date):
            raise TypeError(f"expected a datetime.date or datetime.datetime instance, got "
                            f"{type(value).__name__!r}")
        if not isinstance(value, datetime):
            local = datetime.now(UTC).astimezone().utcoffset()
            value = datetime(value.year, value.month, value.day, tzinfo=timezone(local))
    if value.tzinfo is None:
        if value == datetime.max:
            return (_PG_INFINITY,)
        if value == datetime.min:
            return (_PG_NEGATIVE_INFINITY,)
        value = value.astimezone(UTC)
    delta = value - _PG_EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    if micros == _LAST_MICROS:
        return (_PG_INFINITY,)
    if micros == _FIRST_MICROS:
        return (_PG_NEGATIVE_INFINITY,)
    return (micros,)


def timestamptz_from_pg(value: tuple[int]) -> datetime:
    """The inverse, as asyncpg decodes: an aware UTC datetime, or naive datetime.max and
    datetime.min for the infinities."""
    micros = value[0]
    if micros == _PG_INFINITY:
        return datetime.max
    if micros == _PG_NEGATIVE_INFINITY:
        return datetime.min
    return _PG_EPOCH + timedelta(microseconds=micros)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # binary jsonb is a version byte (1) and the JSON text; COPY needs the binary form. A json
    # column's value comes as its JSON text already (schemas.structure.to_json), as SQLite
    # keeps it; read back, it is the JSON value.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda text: b"\x01" + text.encode(),
                              decoder=lambda b: orjson.loads(b[1:]))
    await conn.set_type_codec("timestamptz", schema="pg_catalog", format="tuple",
                              encoder=timestamptz_to_pg, decoder=timestamptz_from_pg)


class PostgresSink(TablePlans):
    def __init__(self, url: str, key_window_s: int):
        self.url = url
        self._window_ms = key_window_s * 1000  # fence.KeyedRecords
        self._pool: asyncpg.Pool | None = None
        # per table: whether it has the unique key of tables created before offset fences
        self._legacy: dict[str, bool] = {}
        # per table: the structure last prepared, the merge statement of its rows (None: a
        # fenced append) and their column names (_statement)
        self._sql: dict[str, tuple[Structure, str | None, list[str]]] = {}
        self._keys_ready = False  # the fence tables exist in their current form

    async def start(self) -> None:
        try:
            pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4,
                                             init=_init_connection)
        except _BUSY as exc:
            raise _busy(exc) from exc
        try:
            encoding = await pool.fetchval("SELECT current_setting('server_encoding')")
        except BaseException as exc:
            pool.terminate()  # a start is retried: leave no pool behind
            if isinstance(exc, _BUSY):
                raise _busy(exc) from exc
            raise
        if encoding != "UTF8":
            # any Unicode text is accepted: another encoding would refuse (for ever) each
            # batch holding a character it lacks
            await pool.close()
            raise StorageSchemaError(
                f"the database is encoded {encoding}; Sluice stores any Unicode text and "
                "needs a UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')")
        self._pool = pool

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection in a transaction. A transient refusal or a connection lost on
        the way (failover, restart, terminated backend) raises StorageBusy: the transaction
        did not commit, or (lost during COMMIT) its writes are idempotent to retry."""
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn
        except _BUSY as exc:
            raise _busy(exc) from exc
        except _REFUSED as exc:
            raise StorageRefused(described(exc)) from exc
        except asyncpg.InterfaceError as exc:
            # A connection lost inside the block: asyncpg's Transaction.__aexit__ finds it
            # closed and raises InterfaceError in place of the loss, which is its context.
            if isinstance(exc.__context__, _BUSY):
                raise _busy(exc.__context__) from exc
            raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def prepare(self, structure: Structure) -> None:
        table = structure.dataset.id
        columns = table_columns(structure)
        async with self._transaction() as conn:
            # one preparer at a time across worker processes
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table)
            rows = await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = $1", table)
            existing = {r["column_name"]: r["data_type"] for r in rows}
            if not existing:
                await conn.execute(create_table_sql(structure, columns, pg_type))
            else:
                for name, kind in check_columns(table, existing, columns, pg_type):
                    await conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)} "
                                       f"{pg_type(kind)}")
            legacy = False
            if conflict_target(structure) is None:
                legacy = await conn.fetchval(_HAS_UNIQUE, quote(table), list(LEGACY_APPEND_KEY))
                if legacy:  # created before fences: its unique keys keep it exactly once
                    await conn.execute(legacy_idempotency_index_sql(table))
                elif not self._keys_ready:
                    await _fence_tables(conn)
        self._legacy[table] = legacy
        self._sql[table] = self._plan(structure)
        self._keys_ready = self._keys_ready or self._sql[table][1] is None

    def _plan(self, structure: Structure) -> tuple[Structure, str | None, list[str]]:
        columns = table_columns(structure)
        merge = conflict_target(structure) is not None or self._legacy[structure.dataset.id]
        return (structure, self._merge_sql(structure, columns) if merge else None,
                [n for n, _ in columns])

    async def prune(self, now_ms: int, chunk: int = 10_000) -> int:
        """Delete the Idempotency-Key records of this sink's append-only tables that decide
        nothing any more (fence.prune_before), ``chunk`` rows per transaction: a writer
        waits for one chunk at most. The rows deleted."""
        before = fence.prune_before(now_ms, self._window_ms)
        deleted = 0
        for table in [table for table, (_, sql, _) in list(self._sql.items()) if sql is None]:
            while True:
                async with self._transaction() as conn:
                    n = int((await conn.execute(_PRUNE, table, before, chunk)).split()[-1])
                deleted += n
                if n < chunk:
                    break
        return deleted

    def _merge_sql(self, structure: Structure, columns: list[tuple[str, str]]) -> str:
        table = quote(structure.dataset.id)
        names = ", ".join(quote(n) for n, _ in columns)
        # in the conflict key's order: concurrent merges of overlapping keys then take their
        # row locks in one order and wait for each other instead of deadlocking
        target = conflict_target(structure) or list(LEGACY_APPEND_KEY)
        sql = (f"INSERT INTO {table} AS t ({names}) SELECT {names} FROM {_STAGE} "
               f"ORDER BY {', '.join(quote(c) for c in target)} ")
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
        if not rows:
            return WriteResult()
        async with self._transaction() as conn:
            return await self._write_in(conn, structure, rows)

    async def _write_in(self, conn: asyncpg.Connection, structure: Structure,
                        rows: list[Row]) -> WriteResult:
        table = structure.dataset.id
        _, sql, names = self._statement(structure)
        if sql is None:
            return WriteResult(await _append(conn, table, names, rows, self._window_ms))
        await conn.execute(f"CREATE TEMP TABLE {_STAGE} (LIKE {quote(table)}) "
                           "ON COMMIT DROP")
        await conn.copy_records_to_table(
            _STAGE, records=table_rows(rows, runs(rows), timestamptz_to_pg), columns=names)
        returned = await conn.fetch(sql)
        return WriteResult(Counter({r["_request_id"]: r["n"] for r in returned}))

    async def refusals(self, structure: Structure, rows: list[Row]) -> list[str | None]:
        out: list[str | None] = []
        for row in rows:  # each alone, in a transaction rolled back
            try:
                async with self._transaction() as conn:
                    await self._write_in(conn, structure, [row])
                    raise Probed
            except Probed:
                out.append(None)
            except StorageRefused as exc:
                out.append(str(exc))
        return out


async def _fence_tables(conn: asyncpg.Connection) -> None:
    """Create the fence tables, or bring those of an earlier version up to date: the keys it
    recorded get the time of this migration as their receive time, so they stay copies for
    one window (0 would let a late copy through). Looked up first: the DDL locks the table
    against every writer, and most starts have nothing to do."""
    if await conn.fetchval(_KEYS_MIGRATED):
        return
    # one migration at a time across worker processes (each holds its own table's lock)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", fence.KEYS_TABLE)
    for sql in _FENCE_TABLES:
        await conn.execute(sql)
    # a default that is not volatile is evaluated once, and fills the rows without rewriting
    # the table (PostgreSQL 11 and later)
    await conn.execute(f"ALTER TABLE {fence.KEYS_TABLE} ADD COLUMN IF NOT EXISTS received_ms "
                       f"bigint NOT NULL DEFAULT {_NOW_MS}")
    await conn.execute(_KEYS_BY_TIME)


async def _append(conn: asyncpg.Connection, table: str, names: list[str],
                  rows: list[Row], window_ms: int) -> Counter:
    """COPY the rows not stored yet straight into the table, behind the offset fences."""
    batch = runs(rows)
    topics, numbers = map(list, zip(*fence.partitions(batch), strict=True))
    await conn.execute(_NEW_FENCES, table, topics, numbers)
    fences = {(t, p): n for t, p, n in await conn.fetch(_LOCK_FENCES, table, topics, numbers)}
    fresh = fence.above(batch, fences)
    keyed = fence.KeyedRecords(fresh, window_ms)
    if probes := keyed.probes():
        while probes:  # one round, unless a key has several records in the batch
            connectors, tokens, parts, times = map(list, zip(*probes, strict=True))
            keyed.recorded(tuple(r) for r in await conn.fetch(
                _RECORD_KEYS, table, connectors, tokens, parts, times, window_ms))
            probes = keyed.probes()
        fresh = keyed.stored(fresh)
    if fresh:
        await conn.copy_records_to_table(table, records=table_rows(rows, fresh, timestamptz_to_pg),
                                         columns=names)
    topics, numbers, ends = map(list, zip(*fence.next_fences(batch), strict=True))
    await conn.execute(_ADVANCE_FENCES, table, topics, numbers, ends)
    return fence.written(fresh)
