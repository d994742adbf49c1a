"""Dead letters: events that cannot be stored go to ``<entry topic>.dlq`` with the reason.

The value is the event itself (or the undecodable record value); headers keep the original
ones and add the error and the source coordinates, so the event can be fixed and replayed.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from schemas import records as r
from workers.decode import DeadLetter

# With idempotence on, aiokafka asks for a producer id for as long as no broker answers
# (bootstrap answered, but the brokers it advertises cannot be reached): a start that never
# ended, which the worker's stop could not interrupt. Bounded, it fails and is retried.
START_TIMEOUT_S = 10.0


class DeadLetters:
    def __init__(self, bootstrap: str, idempotence: bool):
        self._bootstrap = bootstrap
        self._idempotence = idempotence
        self._producer = self._new_producer()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all",
                                enable_idempotence=self._idempotence,
                                client_id="sluice-worker-dlq")

    async def start(self) -> None:
        """Connect, within START_TIMEOUT_S (TimeoutError: the caller retries, with a new
        producer: a failed one does not start again)."""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await self._producer.start()
        except BaseException:
            failed, self._producer = self._producer, self._new_producer()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(START_TIMEOUT_S):
                    await failed.stop()
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, letters: list[DeadLetter]) -> None:
        """Publish every letter and wait for all acknowledgements.

        A letter too large for a record (a source record near the size limit, plus the
        error headers) goes without its value instead: retried as it is, it would fail for
        ever and hold up its partition. Its headers say so, and where the value still is."""
        if not letters:
            return
        futures = [await self._send(letter) for letter in letters]
        results = await asyncio.gather(*futures, return_exceptions=True)
        too_large = []
        for letter, result in zip(letters, results, strict=True):
            if isinstance(result, MessageSizeTooLargeError):
                too_large.append(letter)
            elif isinstance(result, BaseException):
                raise result
        for letter in too_large:  # the broker refused them (its limit may be below ours)
            await (await self._send(letter, with_value=False))

    async def _send(self, letter: DeadLetter, with_value: bool = True) -> asyncio.Future:
        rec = letter.record
        headers = [h for h in (rec.headers or ()) if not h[0].startswith("sluice-error")]
        headers += [
            (r.H_ERROR_CODE, letter.code.encode()),
            (r.H_ERROR, letter.error.encode()[:4000]),
            (r.H_SOURCE_TOPIC, rec.topic.encode()),
            (r.H_SOURCE_PARTITION, str(rec.partition).encode()),
            (r.H_SOURCE_OFFSET, str(rec.offset).encode()),
        ]
        if letter.index is not None:
            headers.append((r.H_SOURCE_INDEX, str(letter.index).encode()))
        topic = r.dlq_topic(rec.topic)
        if with_value:
            try:
                return await self._producer.send(topic, letter.value, headers=headers)
            except MessageSizeTooLargeError:  # refused before sending: too large for us
                pass
        headers.append((r.H_VALUE_OMITTED, str(len(letter.value)).encode()))
        return await self._producer.send(topic, b"", headers=headers)
