"""Admission in one Redis round trip: the key's token bucket and its Idempotency-Key claim.

Idempotency follows Stripe's semantics (and the IETF httpapi draft): the first request with a
key claims it as *pending*; when it ends with a 2xx its answer is stored for the retention
window and replayed to later requests with the same body; a different body gets 422, a
duplicate while the first is pending gets 409. A request that fails before it is durable
(validation, broker or Redis trouble) releases the key so the retry goes through. A pending
claim expires after the lock TTL, so a crashed process never blocks a key for good.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

from redis.exceptions import RedisError

from gateway.errors import RedisUnavailable
from gateway.scripts import ScriptBatcher
from schemas import metrics
from schemas.dataset import RateLimit

log = logging.getLogger(__name__)

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local remaining = -1
local reset_ms = 0
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < 1 then
    return {0, 0, math.ceil((1 - tokens) * 1000 / rate)}
  end
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
  remaining = math.floor(tokens)
  reset_ms = math.ceil((burst - tokens) * 1000 / rate)
end
if #KEYS < 2 then return {1, remaining, reset_ms} end
local cur = redis.call('HMGET', KEYS[2], 'fp', 'state', 'resp')
if not cur[1] then
  redis.call('HSET', KEYS[2], 'fp', ARGV[3], 'state', 'pending', 'owner', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  return {1, remaining, reset_ms}
end
if cur[1] ~= ARGV[3] then return {3, remaining, reset_ms} end
if cur[2] == 'pending' then return {2, remaining, reset_ms} end
return {4, remaining, reset_ms, cur[3]}
"""

_COMPLETE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'done', 'resp', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
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


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    remaining: int  # tokens left after this request; -1 when the dataset has no rate limit
    reset_ms: int  # until the bucket is full again, or until a token is free when limited
    replay: bytes | None = None  # the stored answer: 3-digit status then the body


class Admitter:
    """Runs the admission, completion and release scripts, batched with concurrent calls."""

    def __init__(self, scripts: ScriptBatcher, lock_ttl_s: int, retention_s: int):
        self._admit = scripts.register(_ADMIT)
        self._complete = scripts.register(_COMPLETE)
        self._release = scripts.register(_RELEASE)
        self._lock_ttl_ms = lock_ttl_s * 1000
        self._retention_ms = retention_s * 1000

    async def admit(self, bucket: str, rate: RateLimit, idem_key: str | None,
                    fingerprint: str, owner: str) -> Admission:
        keys = [bucket] if idem_key is None else [bucket, idem_key]
        args = [rate.requests_per_second, rate.burst, fingerprint, owner, self._lock_ttl_ms]
        try:
            result = await self._admit(keys, args)
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("admit").inc()
            raise RedisUnavailable(headers={"Retry-After": "1"}) from exc
        replay = result[3] if len(result) > 3 else None
        return Admission(Verdict(result[0]), int(result[1]), int(result[2]), replay)

    async def complete(self, idem_key: str, owner: str, status: int, body: bytes) -> bool:
        """Store the answer for replay; False if it could not be stored.

        Never raises: by now the records are durable and the client must get its 202. If the
        answer is not stored, the pending claim expires after the lock TTL and a later retry
        publishes again (workers drop the duplicate by event id, item key or the
        idempotency-key header).
        """
        stored = str(status).encode() + body
        try:
            return bool(await self._complete([idem_key], [owner, stored, self._retention_ms]))
        except RedisError:
            metrics.REDIS_ERRORS.labels("complete").inc()
            log.warning("could not store an idempotent answer; its claim will expire")
            return False

    async def release(self, idem_key: str, owner: str) -> None:
        """Drop our pending claim so a retry is processed; best effort (it expires anyway)."""
        try:
            await self._release([idem_key], [owner])
        except RedisError:
            metrics.REDIS_ERRORS.labels("release").inc()
            log.warning("could not release an idempotency claim; it expires with its lock TTL")
