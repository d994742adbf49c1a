"""The Redis client the gateway and the workers use, with one retry on a broken connection.

After Redis restarts (or a proxy drops idle connections), the pool still holds connections
to the old server; the first command on one fails with "Connection closed by server". One
immediate retry on a fresh connection hides that; a Redis that is really down fails the
retry too (connection refused, or the connect timeout) and the caller sees the error at
once, not after a backoff. redis-py's own default changed between releases (none in 7.x,
ten with exponential backoff in 8.x, and then not for pipelines), so it is set here.

A retried call may have run once already if the connection broke after Redis received it;
every script called through this client tolerates that (the admission script admits its
own pending claim again, completion and release check the owner, counters can be off by
one batch in that case only).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def connect(url: str, timeout_s: float) -> Redis:
    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                          retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
