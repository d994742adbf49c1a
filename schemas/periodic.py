"""A background step run every few seconds until the process stops (gateway and workers),
and at once when woken.

It stops on a flag, not only by cancellation: redis-py 8 now and then swallows the
cancellation of a task that is inside a pipeline call (measured: 2 cancels in 40 lost with a
live Redis), and a loop whose cancel was lost runs forever, so asyncio.Runner, which cancels
every task once at exit and waits for them, never returns and the process never exits.

A step that raises is logged and runs again at the next interval: a background task that
died would stop its work for the rest of the process's life without a sign (request logs and
statistics no longer flushed, say), while the process goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, step: Callable[[], Awaitable[None]], interval: float | None, *,
                 at_start: bool = False, name: str = ""):
        self._step = step
        self._name = name or getattr(step, "__qualname__", repr(step))  # for its log lines
        self._interval = interval  # None: only when woken
        self._at_start = at_start  # run the step once right away, then every interval
        self._stopping = asyncio.Event()
        self._woken = asyncio.Event()  # set by stop() too: it ends the wait
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def wake(self) -> None:
        """Run the step now, or again right after the one running, not at the interval."""
        self._woken.set()

    async def _run(self) -> None:
        if self._at_start:
            await self._step_once()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self._interval)
            if self._stopping.is_set():
                return
            self._woken.clear()
            await self._step_once()

    async def _step_once(self) -> None:
        try:
            await self._step()
        except Exception:  # logged with its traceback; the loop must outlive a broken step
            log.exception("%s failed; it runs again %s", self._name,
                          "when woken" if self._interval is None else f"in {self._interval:g} s")

    async def stop(self, grace: float = 5.0) -> None:
        """Let the step in progress finish (up to ``grace`` seconds), then end the loop."""
        self._stopping.set()
        self._woken.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        while not done:  # the step is stuck: cancel until the task takes it
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=1.0)
