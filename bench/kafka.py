"""Kafka side of the bench: the raw-producer ceiling, a backlog, and a group's progress.

    python -m bench.kafka produce --bootstrap B --topic T --body F (--seconds S | --records N)

sends the body as records with the gateway's headers, acks=all, as fast as the producer goes,
and prints one JSON line: records, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.records import RecordMeta

IN_FLIGHT = 512  # records awaiting acknowledgement at once


async def produce(bootstrap: str, topic: str, values: list[bytes], *,
                  seconds: float | None = None, records: int | None = None,
                  linger_ms: int = 2) -> tuple[int, float]:
    """Send ``values`` in turn until ``seconds`` pass or ``records`` are sent; (sent, seconds)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=False, linger_ms=linger_ms,
                                max_batch_size=1024 * 1024, max_request_size=2 * 1024 * 1024)
    await producer.start()
    slots = asyncio.Semaphore(IN_FLIGHT)
    sent = 0
    try:
        started = time.perf_counter()
        deadline = started + seconds if seconds else float("inf")
        pending: set[asyncio.Future] = set()
        while (records is None or sent < records) and time.perf_counter() < deadline:
            await slots.acquire()
            meta = RecordMeta(f"bench-{sent}", "bench", time.time_ns() // 1_000_000)
            future = await producer.send(topic, values[sent % len(values)],
                                         headers=meta.headers())
            future.add_done_callback(lambda _f: slots.release())
            pending.add(future)
            future.add_done_callback(pending.discard)
            sent += 1
        await asyncio.gather(*pending)
        return sent, time.perf_counter() - started
    finally:
        await producer.stop()


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Offsets the group has committed on ``topic``, summed over its partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        total = 0
        for partition in partitions:
            total += await consumer.committed(TopicPartition(topic, partition)) or 0
        return total
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()
    return consumer.partitions_for_topic(topic) or set()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("produce",))
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--records", type=int)
    args = parser.parse_args()
    body = Path(args.body).read_bytes()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sent, took = runner.run(produce(args.bootstrap, args.topic, [body],
                                        seconds=args.seconds, records=args.records))
    sys.stdout.write(orjson.dumps({"records": sent, "seconds": took}).decode() + "\n")


if __name__ == "__main__":
    main()
