"""Redis Lua scripts called by many concurrent requests, sent together (group commit).

A call goes out at once, in a pipeline of its own, when no pipeline of this process is in
flight; calls made while one is in flight wait for it to return and then go out together in
the next one. Alone, a call costs one round trip, as before; under load the pipelines grow
with the load, so N calls cost one round trip and far less than N times redis-py's
per-command work. Each caller awaits its own result. Scripts are sent by SHA; after a Redis
restart (NOSCRIPT) they are loaded again and the calls that were refused are sent once more
(a refused call did not run).

The batches go out on one connection of the batcher's own, packed and read with redis-py's
connection API, not as a redis-py Pipeline: a Pipeline's execute costs about 75 us of Python
beyond the round trip itself (its pool checkout and return, retry wrapper, observability and
event hooks), several times what the batch's own work costs. A broken connection is retried
on a new one by the client's own retry policy (schemas.redis_client: once).

A Coalescer goes further for calls that one script can serve together: the calls of one turn
of the loop that share a group (on Redis Cluster: keys with the same hash tag) become one
script call, which answers each of them; Redis then runs one script, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Hashable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError


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
        self._scheduled = False
        self._conn: AbstractConnection | None = None  # one batch at a time uses it

    def register(self, text: str) -> Script:
        return Script(self, text)

    def call(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((script, keys, args, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # at the end of this turn of the loop, so the calls of this turn go together; never
        # two pipelines at once, so calls reach Redis in the order they were made (the stored
        # Idempotency-Key answers rely on it: gateway.admission)
        if not self._scheduled and not self._tasks:
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
        except BaseException as exc:  # every caller learns why; none waits for ever
            # a lost connection or a cancelled batch is Redis being unavailable to them (503);
            # anything else unplanned is a bug, theirs to answer with a 500
            error = (RedisError(str(exc) or type(exc).__name__)
                     if isinstance(exc, OSError | asyncio.CancelledError) else exc)
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):  # cancelled (or stopping): pass it on
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
        """Each call's reply, or its error reply as an exception (NoScriptError, ...)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._redis.connection_pool.get_connection()
        packed = conn.pack_commands([("EVALSHA", script.sha, len(keys), *keys, *args)
                                     for script, keys, args, _ in batch])
        # the client's retry policy (schemas.redis_client): a failed round trip has
        # disconnected, so the retry sends on a new connection
        return await conn.retry.call_with_retry(
            lambda: _round_trip(conn, packed, len(batch)), _disconnected)

    async def close(self) -> None:
        """Send what waits, wait for every call, and give the connection back."""
        while self._pending or self._tasks:
            if self._pending and not self._tasks:
                self._send()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._redis.connection_pool.release(conn)


async def _disconnected(_error: Exception) -> None:
    """_round_trip has already dropped the connection."""


async def _round_trip(conn: AbstractConnection, packed: list[bytes], replies: int) -> list[Any]:
    try:
        await conn.send_packed_command(packed)  # connects first if it is not connected
        out: list[Any] = []
        for _ in range(replies):
            try:
                out.append(await conn.read_response())
            except ResponseError as exc:
                out.append(exc)
        return out
    except BaseException:
        await conn.disconnect()  # replies may be left unread: never reuse it as it is
        raise


class Coalescer:
    """Calls made in one turn of the event loop with the same group go out as one call.

    ``send(group, items)`` makes that call at once and returns a future of one result per
    item, in order (a Script call, usually). Each caller awaits its own result; a failure of
    the call fails every caller of its group.
    """

    def __init__(self, send: Callable[[Hashable, list[Any]], asyncio.Future]):
        self._send = send
        self._groups: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}

    def __call__(self, group: Hashable, item: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._groups:
            loop.call_soon(self._flush)
        calls = self._groups.get(group)
        if calls is None:
            self._groups[group] = [(item, future)]
        else:
            calls.append((item, future))
        return future

    def _flush(self) -> None:
        groups, self._groups = self._groups, {}
        for group, calls in groups.items():
            try:
                sent = self._send(group, [item for item, _ in calls])
            except Exception as exc:  # building the call failed: every caller learns why
                _fail(calls, exc)
                continue
            sent.add_done_callback(lambda done, calls=calls: _settle(calls, done))


def _settle(calls: list[tuple[Any, asyncio.Future]], done: asyncio.Future) -> None:
    if done.cancelled():
        for _, future in calls:
            future.cancel()
        return
    error = done.exception()
    if error is not None:
        _fail(calls, error)
        return
    results = done.result()
    if isinstance(results, Exception):
        _fail(calls, results)
        return
    for (_, future), result in zip(calls, results, strict=True):
        if not future.done():  # the caller gave up (cancelled)
            future.set_result(result)


def _fail(calls: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, future in calls:
        if not future.done():
            future.set_exception(error)
