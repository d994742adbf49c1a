"""A worker under its services' outages: PostgreSQL dropping its connection inside a
transaction (a failover, a restart, a terminated backend), PostgreSQL or the broker away when
the worker starts. Each is retried until the service is back, never a crash; a SIGTERM ends
the retries; what was acknowledged is stored once."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from tests.integration.test_faults import MisadvertisedBroker
from tests.integration.test_push import events
from tests.integration.test_workers import Running, count, wait_for
from tests.services import create_topics, free_port
from workers import dlq

pytestmark = pytest.mark.integration


def retries(reason: str) -> float:
    return REGISTRY.get_sample_value("sluice_worker_batch_retries_total",
                                     {"reason": reason}) or 0


async def _grown(read, before: float) -> bool:
    return read() > before


async def _stored(storage_url: str, expected: int) -> bool:
    return await count(storage_url) == expected


class LockHolder:
    """Another connection holding ``statement``'s lock in a transaction until released."""

    def __init__(self, storage_url: str, statement: str):
        self.storage_url, self.statement = storage_url, statement
        self.conn: asyncpg.Connection | None = None

    async def hold(self) -> LockHolder:
        self.conn = await asyncpg.connect(self.storage_url)
        await self.conn.execute("BEGIN")
        await self.conn.execute(self.statement)
        return self

    async def terminate_waiting(self) -> int:
        """Terminate every backend of the database waiting for a lock; how many. (From a
        connection of its own: inside the holder's transaction pg_stat_activity is read once.)"""
        conn = await asyncpg.connect(self.storage_url)
        try:
            return await conn.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock') AS t")
        finally:
            await conn.close()

    async def release(self) -> None:
        if self.conn is not None:
            await self.conn.close()  # ends the transaction: the lock goes
            self.conn = None


def _batch(tag: str, n: int = 10) -> bytes:
    return orjson.dumps([{"region": f"{tag}-{j}", "revenue": j} for j in range(n)])


async def test_a_connection_lost_inside_a_write_is_retried_and_stored_once(gateway,
                                                                           postgres_url):
    """The worker's backend is terminated while its write waits for a lock: asyncpg reports
    the loss as an InterfaceError from the transaction's exit, which is a lost connection
    like any other (StorageBusy), so the write is retried; it does not end the worker."""
    assert (await gateway.post(_batch("before"))).status == 202
    lock = LockHolder(postgres_url, "LOCK TABLE sales IN EXCLUSIVE MODE")
    try:
        async with Running(gateway, postgres_url) as running:
            await wait_for(lambda: _stored(postgres_url, 10))
            before = retries("StorageBusy")
            await lock.hold()
            assert (await gateway.post(_batch("during"))).status == 202
            assert await wait_for(lock.terminate_waiting) == 1  # the write, waiting
            await wait_for(lambda: _grown(lambda: retries("StorageBusy"), before))
            assert not running.task.done()
            assert await count(postgres_url) == 10  # nothing of the lost transaction
            await lock.release()
            await wait_for(lambda: _stored(postgres_url, 20))
            committed = running.worker.batches
            await asyncio.sleep(0.5)  # nothing more arrives
            assert running.worker.batches == committed
    finally:
        await lock.release()
    running.task.result()  # stopped cleanly, no exception
    assert await count(postgres_url) == 20


async def test_a_connection_lost_while_preparing_tables_at_start_is_retried(gateway,
                                                                            postgres_url):
    """The same loss while the worker prepares its tables at start (waiting for another
    preparer's lock): retried, then the worker consumes."""
    assert (await gateway.post(_batch("start"))).status == 202
    before = retries("StorageBusy")
    lock = await LockHolder(postgres_url,
                            "SELECT pg_advisory_xact_lock(hashtext('sales'))").hold()
    try:
        async with Running(gateway, postgres_url) as running:
            assert await wait_for(lock.terminate_waiting) == 1  # the preparer, waiting
            await wait_for(lambda: _grown(lambda: retries("StorageBusy"), before))
            assert not running.task.done()
            assert running.worker.consumer is None  # still starting
            await lock.release()
            await wait_for(lambda: _stored(postgres_url, 10))
    finally:
        await lock.release()
    running.task.result()


async def test_a_worker_waits_for_postgresql_at_start_and_stops_on_request(gateway):
    """PostgreSQL unreachable at start: the worker keeps trying (each try counted) instead
    of exiting with a traceback, and a stop request ends it promptly and cleanly."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/sluice"
    before = retries("ConnectionRefusedError")
    running = Running(gateway, unreachable)
    await running.__aenter__()
    await wait_for(lambda: _grown(lambda: retries("ConnectionRefusedError"), before + 1))
    assert not running.task.done()
    running.worker.stop()
    await asyncio.wait_for(asyncio.shield(running.task), 5)
    running.task.result()


async def test_a_worker_started_while_the_broker_is_down_consumes_once_it_is_up(
        make_gateway, own_broker, postgres_url):
    broker = own_broker()
    broker.stop()
    gateway = await make_gateway(bootstrap=broker.bootstrap, create=False)
    before = retries("KafkaConnectionError")
    async with Running(gateway, postgres_url) as running:
        await wait_for(lambda: _grown(lambda: retries("KafkaConnectionError"), before))
        assert not running.task.done()
        broker.start()
        await create_topics(broker.bootstrap, [gateway.topic, gateway.other_topic],
                            partitions=2)
        await wait_for(lambda: _accepted(gateway), timeout=30, interval=0.25)
        await wait_for(lambda: _stored(postgres_url, 10), timeout=30)
    running.task.result()
    assert len(events(await gateway.published())) == 10


async def _accepted(gateway) -> bool:
    resp = await gateway.post(_batch("broker"), **{"Idempotency-Key": "broker-up"})
    return resp.status == 202


async def test_a_broker_unreachable_past_bootstrap_does_not_hang_the_workers_start(
        gateway, storage_url, monkeypatch):
    """With idempotence on, the dead-letter producer's start asked for a producer id for as
    long as no broker answered, and the worker's stop could not end it. Bounded, it fails,
    is retried (counted), and stop ends the worker."""
    monkeypatch.setattr(dlq, "START_TIMEOUT_S", 0.5, raising=False)
    broker = MisadvertisedBroker()
    broker.start()
    retries = REGISTRY.get_sample_value
    before = retries("sluice_worker_batch_retries_total", {"reason": "TimeoutError"}) or 0
    try:
        running = Running(gateway, storage_url, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                          KAFKA_ENABLE_IDEMPOTENCE="true")
        async with running:
            await wait_for(lambda: _above(retries, before), timeout=20)
        assert running.task.done() and running.task.exception() is None
    finally:
        broker.close()


async def _above(retries, before: float) -> bool:
    return (retries("sluice_worker_batch_retries_total", {"reason": "TimeoutError"}) or 0) > before
