"""The test services themselves, against the real Tansu broker and redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from tests.services import (
    ServiceError,
    TansuBroker,
    consume_all,
    create_topics,
    free_port,
    produce,
)

pytestmark = pytest.mark.integration


def new_topic() -> str:
    return f"test.services.{uuid.uuid4().hex[:10]}"


async def topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_session_broker_is_our_own(kafka):
    assert kafka.running
    assert kafka.bootstrap == f"127.0.0.1:{kafka.port}"
    assert kafka.port != 9092


async def test_consume_all_returns_exactly_what_was_produced(kafka):
    topic = new_topic()
    await create_topics(kafka.bootstrap, [topic], partitions=3)
    await create_topics(kafka.bootstrap, [topic], partitions=3)  # existing: no error
    sent = {f"record-{n}".encode(): [("n", str(n).encode()), ("kind", b"test")]
            for n in range(3)}
    for value, headers in sent.items():
        await produce(kafka.bootstrap, topic, value, headers)

    records = await consume_all(kafka.bootstrap, topic)

    assert {r.value: list(r.headers) for r in records} == sent
    assert len(records) == 3
    assert all(r.topic == topic for r in records)
    assert records == sorted(records, key=lambda r: (r.partition, r.offset))
    assert await consume_all(kafka.bootstrap, topic) == records  # reading changes nothing


async def test_consume_all_reads_records_produced_in_one_batch(kafka):
    """Tansu reports the end of a partition as its last batch's base offset + 1."""
    topic = new_topic()
    await create_topics(kafka.bootstrap, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=False,
                                linger_ms=50)
    await producer.start()
    try:
        sent = [await producer.send(topic, f"v{n}".encode()) for n in range(5)]
        assert [m.offset for m in await asyncio.gather(*sent)] == [0, 1, 2, 3, 4]
    finally:
        await producer.stop()
    assert [r.value for r in await consume_all(kafka.bootstrap, topic)] == [
        b"v0", b"v1", b"v2", b"v3", b"v4"]


async def test_consume_all_of_an_empty_or_missing_topic_is_fast(kafka):
    topic = new_topic()
    await create_topics(kafka.bootstrap, [topic], partitions=3)

    began = time.monotonic()
    assert await consume_all(kafka.bootstrap, topic) == []
    assert await consume_all(kafka.bootstrap, new_topic()) == []
    assert time.monotonic() - began < 1.0


async def test_consume_all_stops_at_the_end_offsets(kafka):
    topic = new_topic()
    await create_topics(kafka.bootstrap, [topic], partitions=3)
    for n in range(5):
        await produce(kafka.bootstrap, topic, str(n).encode(), key=b"same-partition")

    began = time.monotonic()
    records = await consume_all(kafka.bootstrap, topic, timeout=5.0)
    assert [r.value for r in records] == [b"0", b"1", b"2", b"3", b"4"]
    assert time.monotonic() - began < 1.0


async def test_own_broker_stops_and_restarts_empty_on_the_same_port(own_broker):
    broker = own_broker()
    bootstrap = broker.bootstrap
    topic = new_topic()
    await create_topics(bootstrap, [topic], partitions=1)
    await produce(bootstrap, topic, b"before")

    broker.stop()
    began = time.monotonic()
    with pytest.raises((KafkaError, TimeoutError)):
        await asyncio.wait_for(produce(bootstrap, topic, b"while down", request_timeout_ms=2000),
                               timeout=5)
    assert time.monotonic() - began < 5

    broker.restart()
    assert broker.bootstrap == bootstrap
    assert topic not in await topic_names(bootstrap)  # memory storage
    await create_topics(bootstrap, [topic], partitions=1)
    await produce(bootstrap, topic, b"after")
    assert [r.value for r in await consume_all(bootstrap, topic)] == [b"after"]


def test_a_taken_port_is_an_error_not_someone_elses_broker(own_broker):
    taken = own_broker()
    with pytest.raises(ServiceError, match="in use"):
        TansuBroker().start(taken.port)
    assert taken.running


def test_own_redis_stops_and_restarts_on_the_same_port(own_redis):
    server = own_redis()
    url = server.url
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        assert client.ping()
        client.set("k", "v")

        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        server.restart()
        assert server.url == url
        assert client.ping()
        assert client.get("k") is None  # no persistence
    finally:
        client.close()


def test_own_redis_on_a_chosen_port(own_redis):
    port = free_port()
    server = own_redis(port)
    assert server.url == f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("run", [1, 2])
def test_redis_url_starts_empty(redis_url, run):
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        assert client.dbsize() == 0
        client.set(f"left-behind-{run}", "x")
    finally:
        client.close()
