"""Dead letters: events that cannot be stored go to ``<entry topic>.dlq`` with the reason.

The value is the event itself (or the undecodable record value); headers keep the original
ones and add the error and the source coordinates, so the event can be fixed and replayed.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from schemas import records as r
from workers.decode import DeadLetter


class DeadLetters:
    def __init__(self, bootstrap: str, idempotence: bool):
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                          enable_idempotence=idempotence,
                                          client_id="sluice-worker-dlq")

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, letters: list[DeadLetter]) -> None:
        """Publish every letter and wait for all acknowledgements."""
        if not letters:
            return
        futures = []
        for letter in letters:
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
            futures.append(await self._producer.send(r.dlq_topic(rec.topic), letter.value,
                                                     headers=headers))
        await asyncio.gather(*futures)
