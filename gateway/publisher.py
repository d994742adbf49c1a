"""Publishing to the entry topics: the only module that knows Kafka.

A request's items become as few records as the record-size limit allows (normally one), sent
with acks=all; ``publish`` returns only when the broker has acknowledged every one of them, and
raises BrokerUnavailable (503) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Collection, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, UnknownTopicOrPartitionError

from gateway.config import Settings
from gateway.errors import BrokerUnavailable, ItemTooLarge, TopicNotFound
from schemas import metrics
from schemas.records import RecordMeta, encode_values

log = logging.getLogger(__name__)

RETRY_AFTER_S = "2"
_HEADER_ROOM = 64 * 1024  # a record's headers and batch framing on top of its value


class Publisher:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._max_record = settings.kafka_max_record_bytes
        self._timeout = settings.kafka_publish_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._connecting: asyncio.Task | None = None

    def _new_producer(self) -> AIOKafkaProducer:
        s = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id="sluice-gateway",
            acks="all",
            enable_idempotence=s.kafka_idempotence,
            linger_ms=s.kafka_linger_ms,
            max_batch_size=max(s.kafka_max_batch_bytes, s.kafka_max_record_bytes + _HEADER_ROOM),
            max_request_size=s.kafka_max_record_bytes + _HEADER_ROOM,
            compression_type=None if s.kafka_compression == "none" else s.kafka_compression,
            request_timeout_ms=int(s.kafka_publish_timeout_s * 1000),
        )

    async def start(self) -> None:
        """Connect now if the broker answers, else keep trying in the background (not ready)."""
        if not await self._try_connect():
            self._connecting = asyncio.create_task(self._connect_forever())

    async def _try_connect(self) -> bool:
        producer = self._new_producer()
        try:
            # bounded: with idempotence on, aiokafka asks a broker for a producer id for as
            # long as none answers (bootstrap answered, but the brokers it advertises cannot
            # be reached), and the gateway would neither listen nor stop on SIGTERM
            async with asyncio.timeout(self._timeout):
                await producer.start()
        except (KafkaError, TimeoutError) as exc:
            log.warning("Kafka at %s not reachable yet: %s", self._settings.kafka_bootstrap,
                        exc or f"no broker answered within {self._timeout:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await producer.stop()
            return False
        self._producer = producer
        return True

    async def _connect_forever(self) -> None:
        delay = 0.5
        while not await self._try_connect():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        log.info("connected to Kafka at %s", self._settings.kafka_bootstrap)

    async def stop(self) -> None:
        """Flush what is buffered and disconnect (graceful shutdown)."""
        if self._connecting is not None:
            self._connecting.cancel()
        if self._producer is not None:
            await self._producer.stop()  # flushes pending batches first

    async def publish(self, topic: str, items: Sequence[Any], meta: RecordMeta,
                      raw: bytes | None = None) -> int:
        """Send items as records to ``topic``; return the number of records once all are acked.

        ``raw``, when given, is the request body that holds exactly ``items`` as JSON (an
        array or one object): it becomes the record as it is, without encoding the items
        again, unless it is too large for one record.
        """
        producer = self._producer
        if producer is None:
            metrics.PUBLISH_ERRORS.labels("not_connected").inc()
            raise BrokerUnavailable("not connected to Kafka yet",
                                    headers={"Retry-After": RETRY_AFTER_S})
        if raw is not None and len(raw) <= self._max_record:
            values = [raw]
        else:
            values = encode_values(items, self._max_record,
                                   len(raw) if raw is not None else None)
        if len(values) > 1 or len(values[0]) > self._max_record:
            _check_sizes(values, self._max_record)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                await self._ensure_topic(producer, topic)
                parts = len(values)
                # the parts of a split request go to one partition, where their offsets keep
                # their order: the workers' last-writer-wins breaks a tie of receive times by
                # partition and offset, so a later part must never lose to an earlier one
                partition = _one_partition(producer, topic) if parts > 1 else None
                futures = [await producer.send(topic, v, headers=meta.headers(i, parts),
                                               partition=partition)
                           for i, v in enumerate(values)]
                if parts == 1:
                    await futures[0]
                else:
                    await asyncio.gather(*futures)
        except TimeoutError as exc:
            metrics.PUBLISH_ERRORS.labels("timeout").inc()
            raise BrokerUnavailable(f"Kafka did not acknowledge within {self._timeout:g} s",
                                    headers={"Retry-After": RETRY_AFTER_S}) from exc
        except MessageSizeTooLargeError as exc:
            metrics.PUBLISH_ERRORS.labels("too_large").inc()
            raise ItemTooLarge(f"the broker refused a record as too large: {exc}") from exc
        except TopicNotFound:
            metrics.PUBLISH_ERRORS.labels("topic_missing").inc()
            raise
        except KafkaError as exc:
            metrics.PUBLISH_ERRORS.labels("refused").inc()
            raise BrokerUnavailable(f"Kafka refused the records: {type(exc).__name__}",
                                    headers={"Retry-After": RETRY_AFTER_S}) from exc
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
        return len(values)

    async def _ensure_topic(self, producer: AIOKafkaProducer, topic: str) -> None:
        if producer.client.cluster.partitions_for_topic(topic) is not None:
            return
        try:
            await producer.partitions_for(topic)
        except UnknownTopicOrPartitionError as exc:
            raise TopicNotFound(f"entry topic {topic!r} does not exist",
                                headers={"Retry-After": RETRY_AFTER_S}) from exc

    async def ready(self, topics: Sequence[str], timeout: float = 2.0, *,
                    optional: Collection[str] = ()) -> tuple[bool, str]:
        """Whether the broker answers a metadata request and knows every entry topic (those
        in ``optional`` are named when missing, without failing the check)."""
        producer = self._producer
        if producer is None:
            return False, "not connected"
        try:
            async with asyncio.timeout(timeout):
                cluster = await producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError):
            return False, "metadata request failed"
        if not cluster.brokers():
            return False, "no broker answered the metadata request"
        known = cluster.topics()
        missing = [t for t in topics if t not in known]
        if not missing:
            return True, "ok"
        named = ", ".join(missing)
        if any(t not in optional for t in missing):
            return False, f"missing entry topics: {named}"
        return True, f"ok; missing entry topics of datasets added by a reload: {named}"


def _one_partition(producer: AIOKafkaProducer, topic: str) -> int:
    cluster = producer.client.cluster
    choices = (cluster.available_partitions_for_topic(topic)
               or cluster.partitions_for_topic(topic))
    return random.choice(sorted(choices))


def _check_sizes(values: list[bytes], limit: int) -> None:
    for value in values:
        if len(value) > limit:
            raise ItemTooLarge(f"an item encodes to {len(value)} bytes; the largest record is "
                               f"{limit} bytes (KAFKA_MAX_RECORD_BYTES)")
