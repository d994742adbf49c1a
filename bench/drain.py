"""How fast the workers drain a backlog into SQLite and into PostgreSQL.

A backlog of distinct events (records of 100, with the gateway's headers) is written to a
fresh entry topic first; then the workers start and the group's committed offsets are
polled until they reach the end. Every event must become a row (append path, no item key):
the row count is checked, so a fast but lossy drain cannot pass.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench import bodies
from bench.catalogue import write_catalogue
from bench.kafka import committed_total, produce
from bench.procs import cpu_seconds, descendants, named, start
from tests.services import POSTGRES_URL, create_topics, ensure_postgres

EVENTS_PER_RECORD = 100
DISTINCT_RECORDS = 500  # values cycled through the backlog
TIMEOUT_S = 900


async def _fresh_database(name: str) -> str:
    ensure_postgres(POSTGRES_URL)
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


async def _rows(storage_url: str, table: str) -> int:
    if storage_url.startswith("sqlite"):
        with sqlite3.connect(storage_url.removeprefix("sqlite:///")) as conn:
            return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    conn = await asyncpg.connect(storage_url)
    try:
        return await conn.fetchval(f'SELECT count(*) FROM "{table}"')
    finally:
        await conn.close()


def _values(records: int) -> list[bytes]:
    """Record values of different events (each stored row is still its own: append path)."""
    return [bodies.array_of(EVENTS_PER_RECORD, seed=seed) for seed in range(records)]


def _cpu(workers_pids: list[int], broker_pid: int | None, store: str) -> dict[str, float]:
    """CPU seconds so far of the workers, the broker and the storage server (every process of
    the machine's PostgreSQL: its backends, WAL writer and checkpointer; SQLite runs inside
    the workers)."""
    out = {"workers": cpu_seconds(workers_pids)}
    if broker_pid is not None:
        out["broker"] = cpu_seconds(descendants(broker_pid))
    if store == "postgresql":
        out["storage"] = cpu_seconds(named("postgres"))
    return out


async def drain_one(store: str, bootstrap: str, redis_url: str, key: str, work: Path,
                    events: int, processes: int, upsert: bool = False,
                    broker_pid: int | None = None) -> dict[str, Any]:
    """``upsert``: the `sales` example as it is, with its item key (the merge path: one row
    per region, the newest wins), instead of one row per event."""
    suffix = os.urandom(3).hex()
    name = f"{store}_upsert" if upsert else store
    dataset, topic = f"drain_{name}", f"bench.drain.{name}.{suffix}"
    catalogue = work / f"drain-{name}"
    write_catalogue(catalogue, key, {dataset: topic}, item_key=upsert)
    partitions = max(2, processes * 2)
    await create_topics(bootstrap, [topic, topic + ".dlq"], partitions=partitions)
    records = events // EVENTS_PER_RECORD
    values = _values(min(records, DISTINCT_RECORDS))
    sent, produce_s = await produce(bootstrap, topic, values, records=records)
    storage = (f"sqlite:///{work}/drain-{suffix}.db" if store == "sqlite"
               else await _fresh_database(f"sluice_bench_{suffix}"))
    group = f"bench-{store}-{suffix}"
    started = time.monotonic()
    workers = start(f"workers-{store}", ["-m", "workers", "run"], {
        "STORAGE_URL": storage, "SLUICE_CATALOGUE_DIR": str(catalogue),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
        "REDIS_URL": redis_url, "WORKER_GROUP_ID": group, "WORKER_PROCESSES": str(processes),
        "WORKER_METRICS_PORT": "0", "SLUICE_LOG_LEVEL": "WARNING",
    }, work / "logs")
    first_commit = None
    try:
        while True:
            done = await committed_total(bootstrap, group, topic)
            now = time.monotonic()
            if done and first_commit is None:
                first_commit, first_done = now, done
                workers.refresh()
                cpu_first = _cpu(workers.pids, broker_pid, store)
            if done >= sent:
                break
            if workers.proc.poll() is not None or now - started > TIMEOUT_S:
                raise RuntimeError(f"workers stopped or took too long ({done}/{sent} records); "
                                   f"see {workers.log}")
            await asyncio.sleep(0.25)
        finished = time.monotonic()
        workers.refresh()
        cpu = workers.cpu()
        cpu_last = _cpu(workers.pids, broker_pid, store)
    finally:
        workers.stop()
    rows = await _rows(storage, dataset)
    drained = sent * EVENTS_PER_RECORD
    expected = len({e["region"] for v in values for e in orjson.loads(v)}) if upsert else drained
    if rows != expected:
        raise RuntimeError(f"{name}: {rows} rows stored for {drained} events drained "
                           f"({expected} expected)")
    steady_events = (sent - first_done) * EVENTS_PER_RECORD
    steady_s = finished - first_commit
    steady_cpu = {name: cpu_last[name] - cpu_first[name] for name in cpu_last}
    if steady_events < drained / 2:  # a backlog too small to see a steady rate: all of it
        steady_events, steady_s = drained, finished - started
        steady_cpu = {}
    return {
        "events": drained, "rows": rows, "seconds": round(finished - started, 2),
        "steady_seconds": round(steady_s, 2),
        "events_per_s": round(steady_events / steady_s) if steady_s > 0 else None,
        "backlog_produce_seconds": round(produce_s, 2), "workers": processes,
        "partitions": partitions, "workers_cpu_s": round(cpu, 1),
        # where the machine's CPU went per event while draining (steady part): the workers,
        # the broker serving their fetches, and the storage server writing the rows
        "cpu_us_per_event": {name: round(seconds / steady_events * 1e6, 2)
                             for name, seconds in steady_cpu.items()},
    }


def drain(bootstrap: str, redis_url: str, key: str, work: Path, events: int,
          processes: int, broker_pid: int | None = None) -> dict[str, dict[str, Any]]:
    results = {}
    for store, upsert in (("sqlite", False), ("postgresql", False), ("postgresql", True)):
        name = f"{store}_upsert" if upsert else store
        results[name] = asyncio.run(drain_one(store, bootstrap, redis_url, key, work, events,
                                              processes, upsert, broker_pid))
        r = results[name]
        cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_us_per_event"].items())
        print(f"  drain {name:<19} {r['events_per_s']:,} events/s, {r['events']:,} events in "
              f"{r['seconds']} s (cpu us/event: {cpu or 'backlog too small'})", flush=True)
    return results
