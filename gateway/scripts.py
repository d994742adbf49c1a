"""Redis Lua scripts called by many concurrent requests, sent together: one pipeline per tick.

Every call made while the event loop runs one batch of callbacks goes out in a single
pipeline at the next turn of the loop, and each caller awaits its own result. Under load
this turns N round trips (and N times redis-py's per-command work) into one; alone, a call
costs what it did before. Scripts are sent by SHA; after a Redis restart (NOSCRIPT) they are
loaded again and the calls that were refused are sent once more (a refused call did not run).
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
    def __init__(self, redis: Redis):
        self._redis = redis
        self._pending: list[tuple[Script, list[str], list[Any], asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    def register(self, text: str) -> Script:
        return Script(self, text)

    def call(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append((script, keys, args, future))
        return future

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

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
        """Wait for the calls already sent."""
        if self._pending:
            self._send()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
