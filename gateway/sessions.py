"""Ingestion sessions: open one for a dataset, send chunks concurrently, close it, read its state.

State lives in Redis and needs no sweeper. A session's hash holds its dataset, owner, status
and gateway-side counts for the retention window; a separate *alive* key exists while the
session is pending, with the inactivity timeout as its TTL, so ``expired`` is simply "pending
and the alive key is gone". A chunk is gated by one script: a pending, alive session records
the chunk as in flight (a claim that lapses if its gateway dies) and restarts the timer;
anything else is refused before a record is published. When the chunk ends its claim is
dropped and, if it was published, its counts are added in the same step (an end Redis does
not take is tried again until it does: gateway.session_ends), so a session is ``complete``
exactly when it takes no more chunks, none is in flight, no claim lapsed without its chunk
ending (its gateway died mid-chunk: its records may be published and not counted), and the
workers have written (or skipped as duplicates, or dead-lettered) every accepted record.
Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.errors import (
    InvalidParameter,
    RedisUnavailable,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
)
from gateway.ingest import Answer, IngestRequest, Process
from gateway.payload import JSON, parse_items
from gateway.session_ends import DeferredEnds
from schemas import metrics
from schemas import outcomes as o
from schemas import redis_keys as k
from schemas.catalogue import Principal
from schemas.dataset import Dataset

T = TypeVar("T")

PENDING, CLOSED, EXPIRED = "pending", "closed", "expired"
STATUSES = (PENDING, CLOSED, EXPIRED)
ID_PREFIX = "ing_"
STATUS_SCAN = 2000  # newest sessions a status-filtered listing looks at
_CREATE_FIELDS = frozenset({"dataset", "namespace", "entity", "timeout_s"})

# Redis's clock in epoch ms; ``stamp`` is its decimal text (a bare Lua number may be
# written in exponent form).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = string.format('%d', now)
"""

# KEYS: state, alive. ARGV: timeout ms, retention ms, then field/value pairs.
_CREATE = _NOW + """
redis.call('HSET', KEYS[1], 'status', 'pending', 'created_at', stamp,
           'last_activity_at', stamp, unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return now
"""

# KEYS: state, alive, inflight. ARGV: the claim (Claim.member), claim ms, retention ms.
# Returns 1 admitted, 0 unknown, 2 closed, 3 expired.
_BEGIN = """
local s = redis.call('HMGET', KEYS[1], 'status', 'timeout_ms')
if not s[1] then return 0 end
if s[1] == 'closed' then return 2 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 3 end
""" + _NOW + """
redis.call('PEXPIRE', KEYS[2], s[2])
redis.call('ZADD', KEYS[3], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[1], 'last_activity_at', stamp)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: state, alive, inflight, counted. ARGV: the claim (Claim.member), publish (0/1),
# received, accepted, rejected, the chunk's Idempotency-Key with its ingest key id ('' for
# none: Claim.counted_as), retention ms. Counts only when it removes the chunk's claim: the
# Redis client retries a call whose connection broke, possibly after Redis ran it, and a
# failed call is retried in the background (Sessions.leave), so a chunk's end may run more
# than once and must count it once. A chunk whose key was counted already is not counted
# again either: its retry after its process died between counting it and storing its answer,
# which publishes it again (the workers drop that copy). A published chunk with a key also
# settles the lapsed claims of earlier attempts with that key (their process died mid-chunk):
# the chunk they carried is counted now, so they no longer keep the session from completing.
_END = _NOW + """
local claimed = redis.call('ZREM', KEYS[3], ARGV[1]) == 1
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local count = claimed and ARGV[2] == '1'
if count and ARGV[6] ~= '' then
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', stamp)) do
    local at = string.find(other, ':', 1, true)
    if at and string.sub(other, at + 1) == ARGV[6] then redis.call('ZREM', KEYS[3], other) end
  end
  count = redis.call('SADD', KEYS[4], ARGV[6]) == 1
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
end
if count then
  redis.call('HINCRBY', KEYS[1], 'chunks', 1)
  redis.call('HINCRBY', KEYS[1], 'received', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'accepted', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'rejected', ARGV[5])
end
if redis.call('PEXPIRE', KEYS[2], redis.call('HGET', KEYS[1], 'timeout_ms')) == 1 then
  redis.call('HSET', KEYS[1], 'last_activity_at', stamp)
end
return 1
"""

# KEYS: state, alive. ARGV: retention ms. Returns 1 closed now, 0 unknown, 2 closed, 3 expired.
_CLOSE = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 0 end
if s == 'closed' then return 2 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 3 end
""" + _NOW + """
redis.call('HSET', KEYS[1], 'status', 'closed', 'closed_at', stamp)
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: state, alive, inflight, statistics. Returns {} for an unknown session, else the hash,
# whether it is alive, the claims in flight, the workers' counts and the claims that lapsed.
_STATUS = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {} end
""" + _NOW + """
return {h, redis.call('EXISTS', KEYS[2]), redis.call('ZCOUNT', KEYS[3], '(' .. stamp, '+inf'),
        redis.call('HMGET', KEYS[4], 'written', 'duplicates', 'failed'),
        redis.call('ZCOUNT', KEYS[3], '-inf', stamp)}
"""


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(12)


def _well_formed(session_id: str) -> bool:
    hexpart = session_id[len(ID_PREFIX):]
    return (session_id.startswith(ID_PREFIX) and len(hexpart) == 24
            and all(c in "0123456789abcdef" for c in hexpart))


async def _redis(call: Awaitable[T]) -> T:
    """Await a Redis call; Redis trouble is a 503 the client may retry."""
    try:
        return await call
    except RedisError as exc:
        metrics.REDIS_ERRORS.labels("session").inc()
        raise RedisUnavailable("ingestion session state is unreachable; retry later",
                               headers={"Retry-After": "1"}) from exc


def visible(principal: Principal, dataset: str, created_by: str) -> bool:
    """Admin keys see every session; other keys only those they opened, on their datasets."""
    return principal.admin or (principal.key_id == created_by and principal.may_write(dataset))


def _keys(session_id: str) -> list[str]:
    return [k.session_key(session_id), k.session_alive_key(session_id),
            k.session_inflight_key(session_id), o.session_stats_key(session_id)]


@dataclass(frozen=True, slots=True)
class Claim:
    """A chunk's place among its session's chunks in flight, from ``enter`` to ``leave``."""

    session_id: str
    member: str  # in the in-flight set: a random token, then ':' and counted_as if any
    counted_as: str  # the ingest key id and the chunk's Idempotency-Key, or ''


@dataclass(frozen=True, slots=True)
class CreateSpec:
    dataset: str
    namespace: str | None
    timeout_s: int


def parse_create(body: bytes, settings: Settings) -> CreateSpec:
    """The create request: ``{dataset}`` or ``{namespace, entity}``, optional ``timeout_s``."""
    doc = _one_object(body)
    unknown = sorted(set(doc) - _CREATE_FIELDS)
    if unknown:
        raise InvalidParameter(f"unknown field(s) {unknown}; allowed: {sorted(_CREATE_FIELDS)}")
    dataset, entity, namespace = doc.get("dataset"), doc.get("entity"), doc.get("namespace")
    for name, value in (("dataset", dataset), ("entity", entity), ("namespace", namespace)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidParameter(f"{name} must be a non-empty string")
    if dataset is not None and entity is not None and dataset != entity:
        raise InvalidParameter("dataset and entity name different datasets; send one of them")
    dataset = dataset or entity
    if dataset is None:
        raise InvalidParameter("name the dataset: {\"dataset\": ...} or "
                               "{\"namespace\": ..., \"entity\": ...}")
    low, high = settings.session_min_timeout_s, settings.session_max_timeout_s
    timeout = doc.get("timeout_s", settings.session_timeout_s)
    if isinstance(timeout, float) and timeout.is_integer():  # JSON Schema's integer: 900.0
        timeout = int(timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not low <= timeout <= high:
        raise InvalidParameter(f"timeout_s must be an integer between {low} and {high} seconds",
                               minimum=low, maximum=high)
    return CreateSpec(dataset, namespace, timeout)


def parse_close(body: bytes) -> None:
    """The close request: ``{"status": "closed"}``, the only change a session takes."""
    if _one_object(body) != {"status": "closed"}:
        raise InvalidParameter('send {"status": "closed"}: closing is the only change a '
                               "session takes")


def location(session_id: str) -> str:
    return f"/v1/ingestions/{session_id}"


def _one_object(body: bytes) -> dict[str, Any]:
    items = parse_items(body, JSON)
    if len(items) != 1 or not isinstance(items[0], dict):
        raise InvalidParameter("the body must be one JSON object")
    return items[0]


def _text(raw: dict[bytes, bytes] | list[bytes]) -> dict[str, str]:
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return {key.decode(): value.decode() for key, value in raw.items()}


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    dataset: str
    namespace: str | None
    created_by: str
    status: str
    created_at: int  # epoch ms, as every time in the API
    last_activity_at: int
    closed_at: int | None
    timeout_ms: int
    chunks: int
    in_flight: int
    lapsed: int  # claims that lapsed before their chunk ended: its fate is unknown
    received: int
    accepted: int
    rejected: int
    written: int
    duplicates: int
    failed: int

    @classmethod
    def from_reply(cls, session_id: str, reply: list) -> Session:
        fields = _text(reply[0])
        written, duplicates, failed = (_int(v) for v in reply[3])
        status = fields["status"]
        if status == PENDING and not reply[1]:
            status = EXPIRED
        return cls(session_id, fields["dataset"], fields.get("namespace"), fields["created_by"],
                   status, int(fields["created_at"]), int(fields["last_activity_at"]),
                   int(fields["closed_at"]) if "closed_at" in fields else None,
                   int(fields["timeout_ms"]), _int(fields.get("chunks")), int(reply[2]),
                   int(reply[4]), _int(fields.get("received")), _int(fields.get("accepted")),
                   _int(fields.get("rejected")), written, duplicates, failed)

    @property
    def expires_at(self) -> int | None:
        """When a pending session expires (or expired) without another chunk; None once closed."""
        return None if self.status == CLOSED else self.last_activity_at + self.timeout_ms

    @property
    def done(self) -> int:
        return self.written + self.duplicates + self.failed

    @property
    def complete(self) -> bool:
        """Takes no more chunks, none in flight, none whose fate is unknown (a lapsed claim:
        its records may be published without being counted), and every accepted record has
        its fate."""
        return (self.status != PENDING and self.in_flight == 0 and self.lapsed == 0
                and self.done >= self.accepted)

    def document(self) -> dict[str, Any]:
        return {
            "ingestion_id": self.id,
            "dataset": self.dataset,
            "namespace": self.namespace,
            "status": self.status,
            "complete": self.complete,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "last_activity_at": self.last_activity_at,
            "expires_at": self.expires_at,
            "closed_at": self.closed_at,
            "timeout_s": self.timeout_ms // 1000,
            "chunks": self.chunks,
            "chunks_in_flight": self.in_flight,
            "chunks_lapsed": self.lapsed,
            "items_received": self.received,
            "items_accepted": self.accepted,
            "items_rejected": self.rejected,
            "items_written": self.written,
            "items_duplicate": self.duplicates,
            "items_failed": self.failed,
            "items_pending": max(0, self.accepted - self.done),
        }


@dataclass(frozen=True, slots=True)
class Listing:
    total: int  # sessions matching (with a status filter: among the STATUS_SCAN newest)
    sessions: list[Session]
    truncated: bool  # a status filter did not look at every session


class Sessions:
    """Session state in Redis: create, read, close, list, and the gate every chunk passes."""

    def __init__(self, redis: Redis, settings: Settings):
        self._redis = redis
        self._settings = settings
        self._retention_ms = settings.log_max_age_s * 1000
        self._claim_ms = settings.idempotency_lock_ttl_s * 1000  # outlives any publish
        self._create = redis.register_script(_CREATE)
        self._begin = redis.register_script(_BEGIN)
        self._end = redis.register_script(_END)
        self._close = redis.register_script(_CLOSE)
        self._status = redis.register_script(_STATUS)
        self.deferred = DeferredEnds(self._run_end)

    def start(self) -> None:
        self.deferred.start()

    async def stop(self) -> None:
        await self.deferred.stop()

    def chunk_limit(self, dataset: Dataset) -> int:
        return min(self._settings.chunk_max_bytes, dataset.max_request_bytes)

    # -- create, read, close, list ------------------------------------------------------------

    def creation(self, spec: CreateSpec) -> Process:
        """The step that opens a session, run by the Ingestor after admission (rate limit,
        Idempotency-Key), so a retried create replays its first answer."""

        async def create(req: IngestRequest, body: bytes, headers: dict[str, str]) -> Answer:
            session = await self.create(req.dataset.id, spec, req.principal.key_id)
            headers = {**headers, "Location": location(session.id)}
            return Answer(201, orjson.dumps(session.document()), headers)

        return create

    async def create(self, dataset: str, spec: CreateSpec, key_id: str) -> Session:
        session_id = new_id()
        timeout_ms = spec.timeout_s * 1000
        fields: list[Any] = ["dataset", dataset, "created_by", key_id, "timeout_ms", timeout_ms]
        if spec.namespace is not None:
            fields += ["namespace", spec.namespace]
        keys = _keys(session_id)
        now = time.time_ns() / 1e6  # ms with a fraction: sessions opened in one ms keep their order
        pipe = self._redis.pipeline(transaction=False)
        await self._create(keys=keys[:2], args=[timeout_ms, self._retention_ms, *fields],
                           client=pipe)
        for index in (k.sessions_index_key(dataset), k.sessions_index_key(dataset, key_id)):
            pipe.zadd(index, {session_id: now})
            pipe.zremrangebyscore(index, "-inf", now - self._retention_ms)
            pipe.pexpire(index, self._retention_ms)
        created_at = (await _redis(pipe.execute()))[0]
        metrics.SESSIONS.labels(dataset, "opened").inc()
        return Session(session_id, dataset, spec.namespace, key_id, PENDING, created_at,
                       created_at, None, timeout_ms, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    async def get(self, session_id: str, principal: Principal) -> Session:
        """The session if it exists and ``principal`` may see it; 404 alike otherwise."""
        found = (await self._load([session_id]))[0] if _well_formed(session_id) else None
        if found is None or not visible(principal, found.dataset, found.created_by):
            raise SessionNotFound(f"no ingestion session {session_id!r}")
        return found

    async def close(self, session_id: str, principal: Principal) -> Session:
        """Close a pending session; closing a closed or expired one changes nothing."""
        session = await self.get(session_id, principal)
        changed = await _redis(self._close(keys=_keys(session_id)[:2],
                                           args=[self._retention_ms]))
        if changed == 1:
            metrics.SESSIONS.labels(session.dataset, "closed").inc()
        return await self.get(session_id, principal)

    async def listing(self, principal: Principal, datasets: Sequence[str], status: str | None,
                      start: int, size: int) -> Listing:
        """Sessions of ``datasets`` that ``principal`` may see, newest first."""
        indexes = [k.sessions_index_key(d, None if principal.admin else principal.key_id)
                   for d in datasets]
        reach = STATUS_SCAN if status else start + size
        cutoff = int(time.time() * 1000) - self._retention_ms
        pipe = self._redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zremrangebyscore(index, "-inf", cutoff)
            pipe.zcard(index)
            pipe.zrevrange(index, 0, reach - 1, withscores=True)
        results = await _redis(pipe.execute())
        stored = sum(results[1::3])
        newest = sorted((pair for found in results[2::3] for pair in found),
                        key=lambda pair: (-pair[1], pair[0]))[:reach]
        ids = [member.decode() for member, _ in newest]
        if status is None:
            page = [s for s in await self._load(ids[start:start + size]) if s is not None]
            return Listing(stored, page, False)
        matching = [s for s in await self._load(ids) if s is not None and s.status == status]
        return Listing(len(matching), matching[start:start + size], stored > len(ids))

    async def _load(self, ids: Sequence[str]) -> list[Session | None]:
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for session_id in ids:
            await self._status(keys=_keys(session_id), args=[], client=pipe)
        replies = await _redis(pipe.execute())
        return [Session.from_reply(i, r) if r else None for i, r in zip(ids, replies, strict=True)]

    # -- the chunk gate -----------------------------------------------------------------------

    async def enter(self, session_id: str, key_id: str, idempotency_key: str | None) -> Claim:
        """Count a chunk in flight and restart the timer, or refuse it (404, 409); the
        chunk's claim, for ``leave``. A chunk with an Idempotency-Key is counted once per
        key of the ingest key ``key_id``."""
        counted_as = f"{key_id}\0{idempotency_key}" if idempotency_key is not None else ""
        token = secrets.token_hex(8)
        claim = Claim(session_id, f"{token}:{counted_as}" if counted_as else token, counted_as)
        verdict = await _redis(self._begin(keys=_keys(session_id)[:3], args=[
            claim.member, self._claim_ms, self._retention_ms]))
        if verdict == 1:
            return claim
        if verdict == 2:
            raise SessionClosed(f"ingestion session {session_id!r} is closed; nothing of this "
                                "chunk was published",
                                ingestion_id=session_id, session_status=CLOSED)
        if verdict == 3:
            raise SessionExpired(f"ingestion session {session_id!r} expired after its "
                                 "inactivity timeout; nothing of this chunk was published",
                                 ingestion_id=session_id, session_status=EXPIRED)
        raise SessionNotFound(f"no ingestion session {session_id!r}")

    async def leave(self, claim: Claim, counts: tuple[int, int, int] | None) -> None:
        """End the chunk: drop its claim, adding its counts (received, accepted, rejected)
        if it was published. Never raises: the records may be durable already. An end Redis
        does not take is tried again in the background until it does (session_ends); its
        claim stays meanwhile, so the session cannot be complete without the chunk."""
        args = [claim.member, 0, 0, 0, 0] if counts is None else [claim.member, 1, *counts]
        args += [claim.counted_as, self._retention_ms]
        keys = [*_keys(claim.session_id)[:3], k.session_counted_key(claim.session_id)]
        try:
            await self._end(keys=keys, args=args)
        except RedisError:
            metrics.REDIS_ERRORS.labels("session_end").inc()
            self.deferred.add(claim.session_id, keys, args)
        except asyncio.CancelledError:  # the request was cancelled (shutdown): end it anyway
            self.deferred.add(claim.session_id, keys, args)
            raise

    async def _run_end(self, keys: list[str], args: list[Any]) -> None:
        await self._end(keys=keys, args=args)

    async def owner(self, session_id: str, principal: Principal) -> str:
        """The dataset of a session ``principal`` may send chunks to (404 otherwise)."""
        found = None
        if _well_formed(session_id):
            found = await _redis(self._redis.hmget(k.session_key(session_id),
                                                   ["dataset", "created_by"]))
        if found is None or found[0] is None or not visible(
                principal, found[0].decode(), found[1].decode()):
            raise SessionNotFound(f"no ingestion session {session_id!r}")
        return found[0].decode()
