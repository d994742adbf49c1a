"""Outcomes: the fate of every request and event, as both sides record it in Redis.

The gateway records what it received, accepted, rejected, replayed and rate-limited; the
workers record what they wrote, skipped as duplicates and dead-lettered. Counters only ever
grow (HINCRBY), so the two sides never race; a request's processing status is derived from
its counters when read. Key names and fields live here, nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.records import KAFKA_CONNECTOR  # noqa: F401 (the connector of a record without one)
from schemas.redis_keys import PREFIX, session_tag

# Statistics fields (hash per dataset and per dataset+connector).
REQUESTS = "requests"  # HTTP requests that reached the dataset with a valid key
RECEIVED = "received"  # events received (HTTP items, or events in Kafka-native records)
ACCEPTED = "accepted"  # events published to the entry topic (or read from it, Kafka-native)
REJECTED = "rejected"  # events refused by the gateway (validation, limits)
REPLAYED = "replayed"  # requests answered from an Idempotency-Key without publishing
RATE_LIMITED = "rate_limited"  # requests refused with 429
BYTES = "bytes"  # request body bytes received (as sent, before gzip inflation)
WRITTEN = "written"  # events that changed a table
DUPLICATES = "duplicates"  # events skipped by storage: redelivered, repeated, or older
FAILED = "failed"  # events dead-lettered by the workers
FIRST_EVENT_AT = "first_event_at"  # epoch ms of the earliest receive time seen
LAST_EVENT_AT = "last_event_at"  # epoch ms of the latest
COUNTERS = (REQUESTS, RECEIVED, ACCEPTED, REJECTED, REPLAYED, RATE_LIMITED, BYTES, WRITTEN,
            DUPLICATES, FAILED)

LOG_MAX_ENTRIES = 10_000  # per connector; older entries are trimmed
LOG_MAX_AGE_S = 7 * 86_400
MAX_LOGGED_ERRORS = 20  # per request


def stats_key(dataset: str, connector: str | None = None) -> str:
    if connector is None:
        return f"{PREFIX}:stats:{dataset}"
    return f"{PREFIX}:stats:{dataset}:c:{connector}"


def session_stats_key(session_id: str) -> str:
    """Statistics hash of one ingestion session: the same fields as a dataset's."""
    return f"{PREFIX}:session:{session_tag(session_id)}:stats"


def connectors_key(dataset: str) -> str:
    """Set of connectors that ever sent to ``dataset``."""
    return f"{PREFIX}:connectors:{dataset}"


# A connector's log and its requests' entries share a hash tag, so one script writes a whole
# flush of them, also on Redis Cluster.
def _connector_tag(connector: str) -> str:
    return f"{{c/{connector}}}"


def request_key(connector: str, request_id: str) -> str:
    """Hash of one request's log entry."""
    return f"{PREFIX}:req:{_connector_tag(connector)}:{request_id}"


def request_errors_key(connector: str, request_id: str) -> str:
    """List of error entries the workers met for one request (capped). A namespace of its own:
    were it the entry's key plus a suffix, request ``R:errors``'s entry would be request
    ``R``'s list (request ids come from clients and Kafka headers)."""
    return f"{PREFIX}:reqerr:{_connector_tag(connector)}:{request_id}"


def connector_log_key(connector: str) -> str:
    """Sorted set of a connector's request ids, scored by receive time (epoch ms)."""
    return f"{PREFIX}:log:{_connector_tag(connector)}"


# Writes a batch of one connector's request-log entries in one call, and trims the log: the
# entries beyond the newest ARGV[2] or older than ARGV[3] leave the sorted set and their hashes
# and error lists are deleted (left to their TTL, a busy connector's would pile up in Redis:
# 7 days at 5,000 requests/s is 3 billion hashes).
# KEYS: the connector's log, then each entry's request hash (in ARGV[4]'s order).
# ARGV: ttl ms, entries kept, oldest score kept, JSON [[score, request_id, [field, value, ...]]]
# (values as strings), the request hash prefix (request_key(connector, '')), the error list
# prefix (request_errors_key(connector, '')).
# A worker may have counted a request before its entry is written (REQUESTS_SCRIPT); the
# entry's TTL then replaces the short one the worker gave its hash and error list.
# The deleted keys are not in KEYS, but share the log's hash tag: same slot on Redis Cluster.
# The score is written as an integer (Lua would print a large one as 1.7e+12).
LOG_SCRIPT = """
local ttl, lists = ARGV[1], ARGV[6]
local entries = cjson.decode(ARGV[4])
local scored = {}
for i, entry in ipairs(entries) do
  local key = KEYS[i + 1]
  redis.call('HSET', key, unpack(entry[3]))
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', lists .. entry[2], ttl)
  scored[#scored + 1] = string.format('%d', entry[1])
  scored[#scored + 1] = entry[2]
end
-- one command per 1,000 values, not one per entry (a call from Lua costs more than its
-- arguments; unpack() holds a few thousand values at most)
local function in_slices(command, key, values)
  for first = 1, #values, 1000 do
    local last = math.min(first + 999, #values)
    if key then
      redis.call(command, key, unpack(values, first, last))
    else
      redis.call(command, unpack(values, first, last))
    end
  end
end
in_slices('ZADD', KEYS[1], scored)
local prefix, beyond, older = ARGV[5], -(tonumber(ARGV[2]) + 1), '(' .. ARGV[3]
local doomed = {}
for _, ids in ipairs({redis.call('ZRANGE', KEYS[1], 0, beyond),
                      redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', older)}) do
  for _, id in ipairs(ids) do
    doomed[#doomed + 1] = prefix .. id
    doomed[#doomed + 1] = lists .. id
  end
end
in_slices('DEL', nil, doomed)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, beyond)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', older)
return #entries
"""

# The workers' counters and errors of requests of one connector, kept only for requests the
# log holds or may still get. A request whose hash does not exist is either not logged yet
# (the gateway writes its log every 50 ms) or trimmed from the log already: received before
# the oldest entry of a log that holds entries, it was trimmed and is skipped; otherwise its
# hash and error list get ORPHAN_TTL_MS, which the log entry, when it comes, replaces with
# the log's TTL. A logged request's hash keeps the TTL the log gave it.
# KEYS: the connector's log, then the request hashes (one connector: one hash tag).
# ARGV: orphan ttl ms, error list cap, the request hash prefix, the error list prefix, then
# per request: receive time ms, n counters, n errors, the counters as field, increment pairs,
# the errors.
REQUESTS_SCRIPT = """
local orphan, cap = ARGV[1], tonumber(ARGV[2])
local hashes, lists = #ARGV[3], ARGV[4]
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
oldest = oldest and tonumber(oldest)
local i = 5
for k = 2, #KEYS do
  local key = KEYS[k]
  local received, counters, errors = tonumber(ARGV[i]), tonumber(ARGV[i + 1]),
                                     tonumber(ARGV[i + 2])
  local logged = redis.call('EXISTS', key) == 1
  local first_error = i + 3 + 2 * counters
  if logged or oldest == nil or received >= oldest then  -- else trimmed already: skipped
    for c = i + 3, first_error - 1, 2 do
      redis.call('HINCRBY', key, ARGV[c], ARGV[c + 1])
    end
    if not logged then redis.call('PEXPIRE', key, orphan) end
    if errors > 0 then
      local list = lists .. string.sub(key, hashes + 1)
      redis.call('RPUSH', list, unpack(ARGV, first_error, first_error + errors - 1))
      redis.call('LTRIM', list, 0, cap - 1)
      local left = logged and redis.call('PTTL', key) or -1
      redis.call('PEXPIRE', list, left > 0 and left or orphan)
    end
  end
  i = first_error + errors
end
return #KEYS - 1
"""
ORPHAN_TTL_MS = 10 * 60_000


# Adds counters to every hash in KEYS and widens its first/last event times.
# ARGV: first_ms ('' for none), last_ms ('' for none), then field, increment pairs.
ACCOUNT_SCRIPT = """
for _, key in ipairs(KEYS) do
  for i = 3, #ARGV, 2 do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  end
  if ARGV[1] ~= '' then
    local cur = tonumber(redis.call('HGET', key, 'first_event_at'))
    if not cur or tonumber(ARGV[1]) < cur then
      redis.call('HSET', key, 'first_event_at', ARGV[1])
    end
  end
  if ARGV[2] ~= '' then
    local cur = tonumber(redis.call('HGET', key, 'last_event_at'))
    if not cur or tonumber(ARGV[2]) > cur then
      redis.call('HSET', key, 'last_event_at', ARGV[2])
    end
  end
end
return 1
"""


def account_args(counts: Mapping[str, int], first: int | str, last: int | str) -> list[Any]:
    """ACCOUNT_SCRIPT's arguments: first and last event times ('' for none), then the
    non-zero counters as field, increment pairs."""
    return [first, last, *(x for pair in counts.items() if pair[1] for x in pair)]


def processing_status(entry: Mapping[str, Any]) -> str:
    """received, processed, partially failed or failed, from a request's counters."""
    http_status = int(entry.get("http_status", 202))
    accepted = int(entry.get(ACCEPTED, 0))
    rejected = int(entry.get(REJECTED, 0))
    done = int(entry.get(WRITTEN, 0)) + int(entry.get(DUPLICATES, 0))
    failed = int(entry.get(FAILED, 0))
    if http_status >= 400 or (accepted == 0 and rejected > 0):
        return "failed"
    if done + failed < accepted:
        return "received"
    if failed == 0 and rejected == 0:
        return "processed"
    if done == 0:
        return "failed"
    return "partially failed"
