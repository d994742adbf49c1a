"""The per-process budget of request-body bytes in processing: explicit backpressure on memory.

Parsing a body makes Python objects worth up to about 40 times its (inflated) size, so the
bodies a process parses at once, not the number of its connections, decide its peak memory.
Each request takes its body's size (inflated size for gzip) from the budget before it is
fingerprinted, admitted and parsed, and gives it back once its answer is built. A request
that does not fit waits up to ``wait_s`` for others to finish, then is refused with 503
``SERVER_BUSY``: it was never admitted, so it claimed no Idempotency-Key and published nothing.

When there is room, taking is one add and one compare: no lock, no await (one event loop per
process owns the counter).
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.errors import ServerBusy
from schemas import metrics

WAIT_S = 1.0  # how long a request that does not fit waits for room before 503
RETRY_AFTER_S = "1"


class BodyBudget:
    def __init__(self, capacity: int, wait_s: float = WAIT_S):
        self.capacity = capacity
        self.in_use = 0
        self._wait_s = wait_s
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def counted(self, size: int) -> int:
        """What a body of ``size`` bytes takes: a body larger than the whole budget takes the
        whole budget, so it is admitted alone rather than never."""
        return size if size <= self.capacity else self.capacity

    def try_take(self, size: int) -> bool:
        """Take ``size`` (counted) bytes if there is room now: the hot path."""
        if self.in_use + size <= self.capacity:
            self.in_use += size
            return True
        return False

    async def wait(self, size: int, dataset: str) -> None:
        """Take ``size`` (counted) bytes once there is room, waiting up to ``wait_s``;
        ServerBusy past that."""
        waiter = (size, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait_s):
                await waiter[1]
        except BaseException as exc:
            future = waiter[1]
            if future.done() and not future.cancelled():
                self.give(size)  # granted just as it gave up: hand the bytes back
            else:
                future.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                metrics.child(metrics.BODY_BUDGET_WAITS, dataset, "refused").inc()
                raise ServerBusy(
                    f"the gateway is busy with other large request bodies; this {size}-byte "
                    f"body did not fit within {self._wait_s:g} s. Nothing was accepted; "
                    f"retry after {RETRY_AFTER_S} s",
                    headers={"Retry-After": RETRY_AFTER_S}) from None
            raise
        metrics.child(metrics.BODY_BUDGET_WAITS, dataset, "admitted").inc()

    def give(self, size: int) -> None:
        self.in_use -= size
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        # In arrival order, every waiter that fits now; one that does not fit is skipped
        # (a smaller one behind it may fit: each waits at most wait_s anyway).
        for waiter in list(self._waiters):
            size, future = waiter
            if future.done():  # gave up (timeout, cancellation): removed by its own task
                continue
            if self.in_use + size <= self.capacity:
                self.in_use += size
                future.set_result(None)
                self._waiters.remove(waiter)
