"""Chunk ends Redis did not take, tried again in the background until it does.

A chunk's end (``gateway.sessions``: drop its claim, count it if it was published) can fail
after the chunk was published and answered 201: a Redis timeout, a broken connection, a
failover. Dropped, the chunk would never be counted: its claim would lapse and the session
could report ``complete`` before its records were written. An end may run more than once
(it counts only when it removes its claim), so a failed one is kept here and tried again
every ``interval`` seconds until Redis takes it. Meanwhile its claim stays: the chunk shows
as in flight, then (once the claim lapsed) as lapsed, and the session is not complete.

Bounded: at most ``max_pending`` ends are kept (the oldest is given up beyond that), each
for ``give_up_after_s``; when the process stops, those left get one last try. An end given
up leaves its claim lapsed for good, which the session shows (``chunks_lapsed``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from schemas import metrics
from schemas.periodic import Periodic

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 0.5
GIVE_UP_AFTER_S = 600.0
MAX_PENDING = 10_000


@dataclass(eq=False, slots=True)  # compared by identity: the same end may be kept twice
class End:
    session_id: str
    keys: list[str]
    args: list[Any]
    since: float  # time.monotonic() of the first failure


class DeferredEnds:
    def __init__(self, run: Callable[[list[str], list[Any]], Awaitable[Any]], *,
                 interval: float = RETRY_INTERVAL_S, give_up_after_s: float = GIVE_UP_AFTER_S,
                 max_pending: int = MAX_PENDING):
        self._run = run
        self._give_up_after_s = give_up_after_s
        self._max_pending = max_pending
        self._pending: deque[End] = deque()
        self._retrier = Periodic(self.retry, interval, name="deferred chunk ends")

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._retrier.start()

    async def stop(self) -> None:
        """Stop retrying; give what is left one last try, and log what is given up."""
        await self._retrier.stop()
        await self.retry()
        while self._pending:
            self._give_up(self._pending.popleft(), "the gateway stopped")

    def add(self, session_id: str, keys: list[str], args: list[Any]) -> None:
        """Keep an end that failed, to be tried again."""
        if len(self._pending) >= self._max_pending:
            self._give_up(self._pending.popleft(), f"more than {self._max_pending} are waiting")
        self._pending.append(End(session_id, keys, args, time.monotonic()))
        log.warning("could not end a chunk of ingestion session %s; trying again in the "
                    "background (until then it counts as in flight)", session_id)

    async def retry(self) -> None:
        """One pass: each end in turn until one fails (Redis is still away: next pass)."""
        for _ in range(len(self._pending)):
            if not self._pending:
                return
            end = self._pending[0]
            try:
                await self._run(end.keys, end.args)
            except RedisError:
                metrics.REDIS_ERRORS.labels("session_end").inc()
                if end in self._pending:
                    self._pending.remove(end)
                    if time.monotonic() - end.since >= self._give_up_after_s:
                        self._give_up(end, f"Redis refused it for {self._give_up_after_s:g} s")
                    else:
                        self._pending.append(end)  # the others get their turn first
                return
            if end in self._pending:
                self._pending.remove(end)
            log.info("ended a chunk of ingestion session %s after %.1f s", end.session_id,
                     time.monotonic() - end.since)

    @staticmethod
    def _give_up(end: End, why: str) -> None:
        log.error("gave up ending a chunk of ingestion session %s (%s): the session shows "
                  "it as lapsed and never becomes complete", end.session_id, why)
