"""The per-process budget of request-body bytes held in memory: explicit backpressure on memory.

Parsing a body makes Python objects worth up to about 40 times its (inflated) size, so the
bodies a process holds at once, not the number of its connections, decide its peak memory.
Each request holds its body's bytes in the budget (a Hold) from the moment its route starts
reading the body until its answer is built: a declared Content-Length before the first byte
is read, a chunked body's bytes as each piece arrives (before the piece is kept), and for
gzip the inflated bytes too, each piece before it is inflated. The inflated size, which
parsing multiplies, is thus held before parsing, as it was when only processing was
counted. A request that does not fit waits up to ``wait_s`` for others to finish, then is
refused with 503 ``SERVER_BUSY``: bodies are read and inflated before admission, so it
claimed no Idempotency-Key and published nothing. Its route releases the hold whole however
the request ends (answered, refused, timed out, left by its client, cancelled).

When there is room, taking is one add and one compare: no lock, no await (one event loop per
process owns the counter); a body already covered (its declared length) costs a compare.
"""

from __future__ import annotations

import asyncio
import sys
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

    def hold(self, dataset: str) -> Hold:
        """A request's share, empty until its body is read (``dataset`` labels its waits)."""
        return Hold(self, dataset)

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

    async def wait(self, size: int, dataset: str, body: int | None = None) -> None:
        """Take ``size`` (counted) bytes once there is room, waiting up to ``wait_s``;
        ServerBusy past that. ``body``: the bytes the request needs in all, for its answer."""
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
                    f"the gateway is busy with other large request bodies; the "
                    f"{size if body is None else body} bytes this one needed did not fit "
                    f"within {self._wait_s:g} s. Nothing was accepted; retry after "
                    f"{RETRY_AFTER_S} s", headers={"Retry-After": RETRY_AFTER_S}) from None
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


class Hold:
    """The bytes one request holds in the budget: grown as its body arrives and inflates,
    given back whole by ``release`` (or leaving ``with``), which the route does however the
    request ends. Sizes are totals for the request, counted as BodyBudget.counted counts."""

    __slots__ = ("_budget", "dataset", "held")

    def __init__(self, budget: BodyBudget, dataset: str):
        self._budget = budget
        self.dataset = dataset
        self.held = 0

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def try_cover(self, size: int) -> bool:
        """Hold ``size`` bytes in all if it does already or there is room now: the hot path,
        BodyBudget.counted and try_take written out (twice per request)."""
        budget = self._budget
        capacity = budget.capacity
        extra = (size if size <= capacity else capacity) - self.held
        if extra <= 0:
            return True
        if budget.in_use + extra <= capacity:
            budget.in_use += extra
            self.held += extra
            return True
        return False

    async def cover(self, size: int) -> None:
        """Hold ``size`` bytes in all, waiting for room as BodyBudget.wait does (ServerBusy
        when none came in time; the hold keeps what it had, for release)."""
        if self.try_cover(size):
            return
        extra = self._budget.counted(size) - self.held
        await self._budget.wait(extra, self.dataset, size)
        self.held += extra

    def spare(self, used: int) -> int:
        """How many bytes past ``used`` (of those held) could be covered now without waiting:
        what is held past it and the budget's free room; no end for a hold that counts as
        the whole budget already (it is alone)."""
        budget = self._budget
        if self.held >= budget.capacity:
            return sys.maxsize
        return self.held - used + budget.capacity - budget.in_use

    def fit(self, size: int) -> None:
        """Hold ``size`` bytes in all, giving back any more than that."""
        extra = self.held - self._budget.counted(size)
        if extra > 0:
            self.held -= extra
            self._budget.give(extra)

    def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            self._budget.give(held)
