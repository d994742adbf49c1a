"""Admission in one Redis round trip: the key's token bucket and its Idempotency-Key claim.

The requests of one ingest key on one dataset that arrive together are admitted by one
script call (and their answers stored by one): the cost in Redis is per group, not per request.

Idempotency follows Stripe's semantics (and the IETF httpapi draft): the first request with a
key claims it as *pending*; when it ends with a 2xx its answer is stored for the retention
window and replayed to later requests with the same body; a different body gets 422, a
duplicate while the first is pending gets 409 (after a short look again: the answer is stored
just after the 202, see Admitter.complete). A request that fails before it is durable
(validation, broker or Redis trouble) releases the key so the retry goes through. A pending
claim expires after the lock TTL, so a crashed process never blocks a key for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from asyncio import Future
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis.exceptions import RedisError

from gateway.errors import RedisUnavailable
from gateway.scripts import Coalescer, ScriptBatcher
from schemas import metrics
from schemas.dataset import RateLimit
from schemas.redis_keys import hash_tag

log = logging.getLogger(__name__)

# How long a duplicate that meets a pending claim waits before each look again (Admitter.admit)
_SETTLE_WAITS_S = (0.002, 0.004, 0.008, 0.016, 0.032)
_NO_LIMIT = RateLimit(0, 0)  # a look again takes no token: the first look took one

# Admits every request of one ingest key on one dataset that arrived in one turn of the
# event loop, in order: one script call, one read and one write of the token bucket.
# KEYS: the rate bucket, then the Idempotency-Key records of the requests that have one.
# ARGV: rate/s (0: no limit), burst, lock TTL ms, then per request: the index in KEYS of its
# Idempotency-Key record (0 for none), its fingerprint, its owner (a token of the ingest call).
# Returns per request {verdict, remaining, reset_ms[, stored answer]} (Verdict below).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tokens = 0
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
end
local taken = false
local out = {}
for i = 1, (#ARGV - 3) / 3 do
  local k = tonumber(ARGV[3 * i + 1])
  local key, cur = nil, nil
  if k ~= 0 then
    key = KEYS[k]
    cur = redis.call('HMGET', key, 'fp', 'state', 'resp', 'owner')
  end
  if cur and cur[2] == 'pending' and cur[4] == ARGV[3 * i + 3] then
    -- our own claim: this call was retried after it had run (schemas.redis_client), and
    -- that run took its token: asked first, or the retry could be limited and leave the
    -- claim pending for the lock's TTL
    if rate > 0 then
      out[i] = {1, math.floor(tokens), math.ceil((burst - tokens) * 1000 / rate)}
    else
      out[i] = {1, -1, 0}
    end
  else
    local remaining = -1
    local reset_ms = 0
    local limited = false
    if rate > 0 then
      if tokens < 1 then
        out[i] = {0, 0, math.ceil((1 - tokens) * 1000 / rate)}
        limited = true
      else
        tokens = tokens - 1
        taken = true
        remaining = math.floor(tokens)
        reset_ms = math.ceil((burst - tokens) * 1000 / rate)
      end
    end
    if not limited then
      if k == 0 then
        out[i] = {1, remaining, reset_ms}
      elseif not cur[1] then
        redis.call('HSET', key, 'fp', ARGV[3 * i + 2], 'state', 'pending', 'owner',
                   ARGV[3 * i + 3])
        redis.call('PEXPIRE', key, ARGV[3])
        out[i] = {1, remaining, reset_ms}
      elseif cur[1] ~= ARGV[3 * i + 2] then
        out[i] = {3, remaining, reset_ms}
      elseif cur[2] == 'pending' then
        out[i] = {2, remaining, reset_ms}
      else
        out[i] = {4, remaining, reset_ms, cur[3]}
      end
    end
  end
end
if taken then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
return out
"""

# Stores the answers of requests that share a hash tag; a record whose owner changed (its
# claim expired and another request took it) is left alone.
# KEYS: Idempotency-Key records. ARGV: retention ms, then per key: owner, stored answer.
_COMPLETE = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'owner') == ARGV[2 * i] then
    redis.call('HSET', key, 'state', 'done', 'resp', ARGV[2 * i + 1])
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Verdict(IntEnum):
    RATE_LIMITED = 0
    PROCEED = 1
    IN_FLIGHT = 2
    BODY_MISMATCH = 3
    REPLAY = 4


_RELEASE_RETRIES_S = (0.2, 0.5, 1.0, 2.0, 4.0)  # 7.7 s: well within a lock's TTL
_VERDICTS = tuple(Verdict)  # by value, without IntEnum's lookup on every request


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    remaining: int  # tokens left after this request; -1 when the dataset has no rate limit
    reset_ms: int  # until the bucket is full again, or until a token is free when limited
    replay: bytes | None = None  # the stored answer: 3-digit status then the body


def _completed(sent: Future) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        metrics.REDIS_ERRORS.labels("complete").inc()
        log.warning("could not store an idempotent answer (%s); its claim will expire",
                    type(sent.exception()).__name__)


class Admitter:
    """Runs the admission, completion and release scripts, batched with concurrent calls."""

    def __init__(self, scripts: ScriptBatcher, lock_ttl_s: int, retention_s: int):
        self._admit = scripts.register(_ADMIT)
        self._complete = scripts.register(_COMPLETE)
        self._release = scripts.register(_RELEASE)
        self._lock_ttl_ms = lock_ttl_s * 1000
        self._retention_ms = retention_s * 1000
        self._admits = Coalescer(self._send_admits)
        self._releasing: set[asyncio.Task] = set()
        self._completes = Coalescer(self._send_completes)

    async def admit(self, bucket: str, rate: RateLimit, idem_key: str | None,
                    fingerprint: str, owner: str) -> Admission:
        """``idem_key`` must share ``bucket``'s hash tag (schemas.redis_keys builds both).

        A duplicate that meets a pending claim looks again a few times (62 ms in all) before
        it is IN_FLIGHT: the first request's answer is stored just after its 202, so a retry
        sent the moment the 202 arrives can get here first; it then gets the replay. If the
        claim was released meanwhile (the first request failed), this request takes it.
        """
        admission = await self._admit_once(bucket, rate, idem_key, fingerprint, owner)
        if admission.verdict is not Verdict.IN_FLIGHT:
            return admission
        for wait in _SETTLE_WAITS_S:
            await asyncio.sleep(wait)
            again = await self._admit_once(bucket, _NO_LIMIT, idem_key, fingerprint, owner)
            if again.verdict is not Verdict.IN_FLIGHT:  # the rate headers of the first look
                return dataclasses.replace(again, remaining=admission.remaining,
                                           reset_ms=admission.reset_ms)
        return admission

    async def _admit_once(self, bucket: str, rate: RateLimit, idem_key: str | None,
                          fingerprint: str, owner: str) -> Admission:
        try:
            result = await self._admits((bucket, rate.requests_per_second, rate.burst),
                                        (idem_key, fingerprint, owner))
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("admit").inc()
            if idem_key is not None:
                self._release_later(idem_key, owner)
            raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
        replay = result[3] if len(result) > 3 else None
        return Admission(_VERDICTS[result[0]], int(result[1]), int(result[2]), replay)

    def _send_admits(self, group: tuple[str, float, int], calls: list[tuple]) -> Future:
        bucket, rate, burst = group
        keys = [bucket]
        args: list[Any] = [rate, burst, self._lock_ttl_ms]
        for idem_key, fingerprint, owner in calls:
            if idem_key is None:
                args += (0, "", owner)
            else:
                keys.append(idem_key)
                args += (len(keys), fingerprint, owner)
        return self._admit(keys, args)

    def complete(self, idem_key: str, owner: str, status: int, body: bytes) -> Future:
        """Store the answer for replay, without holding up the answer itself: the records are
        durable, so the client gets its 202 now and the answer is stored with the next
        pipeline (the future says 1 if it was stored, 0 if the claim is no longer ours).

        Until it lands (about a millisecond), a retry finds the claim pending and looks again
        (``admit``), so it gets the replay; never a second publish. This process's later
        calls go out after it on the same connection. It never fails the request: a failure
        is counted and logged here, the claim expires after the lock TTL and a later retry
        publishes again (workers drop the duplicate by event id, item key or the
        Idempotency-Key header), the same as when a process dies between the broker's ack
        and storing the answer.
        """
        stored = str(status).encode() + body
        sent = self._completes(hash_tag(idem_key), (idem_key, owner, stored))
        sent.add_done_callback(_completed)
        return sent

    def _send_completes(self, _tag: str, calls: list[tuple[str, str, bytes]]) -> Future:
        args: list[Any] = [self._retention_ms]
        for _, owner, stored in calls:
            args += (owner, stored)
        return self._complete([key for key, _, _ in calls], args)

    def _release_later(self, idem_key: str, owner: str) -> None:
        """The admission failed on our side, but Redis may have run it (the answer was lost,
        a timeout): then our claim is pending, and the client's retries would get 409 until
        the lock expires. Released in the background once Redis answers again, a few tries
        (only our own claim: the owner is this call's)."""
        task = asyncio.get_running_loop().create_task(self._release_soon(idem_key, owner))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_soon(self, idem_key: str, owner: str) -> None:
        # Until a release finds the claim: the late admission may run after a first release
        # (it was sent on the connection the timeout closed, the release on a new one), or
        # never (then every try finds nothing, and costs a script call).
        for delay in _RELEASE_RETRIES_S:
            await asyncio.sleep(delay)
            with contextlib.suppress(RedisError):
                if await self._release([idem_key], [owner]):
                    return

    async def close(self) -> None:
        """Stop the background releases (a claim left expires with its lock TTL)."""
        for task in list(self._releasing):
            task.cancel()
        await asyncio.gather(*self._releasing, return_exceptions=True)

    async def release(self, idem_key: str, owner: str) -> None:
        """Drop our pending claim so a retry is processed; best effort (it expires anyway)."""
        try:
            await self._release([idem_key], [owner])
        except RedisError:
            metrics.REDIS_ERRORS.labels("release").inc()
            log.warning("could not release an idempotency claim; it expires with its lock TTL")
