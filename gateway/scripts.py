"""Redis Lua scripts called by many concurrent requests, sent together (group commit).

A call goes out at once, in a pipeline of its own, when no pipeline of this process is in
flight; calls made while one is in flight wait for it to return and then go out together in
the next one. Alone, a call costs one round trip, as before; under load the pipelines grow
with the load, so N calls cost one round trip and far less than N times redis-py's
per-command work. Each caller awaits its own result. Scripts are sent by SHA; after a Redis
restart (NOSCRIPT) they are loaded again and the calls that were refused are sent once more
(a refused call did not run).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError


class Script:
    """A Lua script known by its SHA-1, called through a ScriptBatcher."""

    def __init__(self, batcher: ScriptBatcher, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self._batcher = batcher

    def __call__(self, keys: list[str], args: list[Any]) -> asyncio.Future:
        return self._batcher.call(self, keys, args)


class ScriptBatcher:
    def __init__(self, redis: Redis, in_flight: int = 1):
        self._redis = redis
        self._pending: list[tuple[Script, list[str], list[Any], asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        self._max_in_flight = in_flight
        self._scheduled = False

    def register(self, text: str) -> Script:
        return Script(self, text)

    def call(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((script, keys, args, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # at the end of this turn of the loop, so the calls of this turn go together
        if not self._scheduled and len(self._tasks) < self._max_in_flight:
            self._scheduled = True
            loop.call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._pending:
            self._schedule(asyncio.get_running_loop())

    async def _run(self, batch: list[tuple[Script, list[str], list[Any], asyncio.Future]]
                   ) -> None:
        try:
            results = await self._execute(batch)
            refused = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if refused:
                again = [batch[i] for i in refused]
                for script in {id(s): s for s, *_ in again}.values():
                    await self._redis.script_load(script.text)
                for i, result in zip(refused, await self._execute(again), strict=True):
                    results[i] = result
        except (RedisError, OSError, asyncio.CancelledError) as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, RedisError)
                                         else RedisError(str(exc) or type(exc).__name__))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        """Send what waits and wait for every call."""
        while self._pending or self._tasks:
            if self._pending and not self._tasks:
                self._send()
            await asyncio.gather(*self._tasks, return_exceptions=True)
