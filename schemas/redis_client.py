"""The Redis client the gateway and the workers use, with one retry on a broken connection.

After Redis restarts (or a proxy drops idle connections), the pool still holds connections
to the old server; the first command on one fails with "Connection closed by server". One
immediate retry on a fresh connection hides that; a Redis that is really down fails the
retry too (connection refused, or the connect timeout) and the caller sees the error at
once, not after a backoff. redis-py's own default changed between releases (none in 7.x,
ten with exponential backoff in 8.x, and then not for pipelines), so it is set here.

A retried call may have run once already if the connection broke after Redis received it;
every script called through this client tolerates that (the admission script admits its
own pending claim again, completion and release check the owner, a session chunk's end
counts the chunk only when it removes its claim, counters can be off by one batch in that
case only).

Commands are packed by hiredis (C), as redis-py's synchronous client packs them; its asyncio
client packs each argument in Python (9.2 us for an admission call of two requests, 1.6 us
with hiredis; the gateway serves 3.9 % more single-event requests per second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError

SENTINEL_SCHEME = "redis+sentinel"


def connect(url: str, timeout_s: float) -> Redis:
    """A client for ``url``: redis://, rediss:// or unix:// (one server), or
    redis+sentinel:// (the current primary of a Sentinel-monitored group)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
    if urlparse(url).scheme != SENTINEL_SCHEME:
        client = Redis.from_url(url, **options)
        pool = client.connection_pool  # no connection is made yet: from here on, ours
        pool.connection_class = _HIREDIS_PACKING.get(pool.connection_class, pool.connection_class)
        return client
    where = sentinel_url(url)
    sentinel = Sentinel(where.sentinels, sentinel_kwargs={
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
        "password": where.sentinel_password})
    return sentinel.master_for(where.service, db=where.db, username=where.username,
                               password=where.password, connection_class=_PrimaryConnection,
                               **options)


_PACKER = HiredisRespSerializer()


class _HiredisPacking:
    """pack_command by hiredis: the same bytes as redis-py's Python packer (a test checks)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if (" " if isinstance(name, str) else b" ") in name:  # "SCRIPT LOAD": redis-py splits
            return _PACKER.pack(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # bytearray or memoryview (redis-py's packer takes them) or DataError
            return _PACKER.pack(*args)


class _Connection(_HiredisPacking, Connection):
    pass


class _SSLConnection(_HiredisPacking, SSLConnection):
    pass


class _UnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


# redis-py's choice by URL scheme -> the same with hiredis packing
_HIREDIS_PACKING: dict[type, type] = {Connection: _Connection, SSLConnection: _SSLConnection,
                                      UnixDomainSocketConnection: _UnixConnection}


class _PrimaryConnection(_HiredisPacking, SentinelManagedConnection):
    """A connection that asks the Sentinels for the primary's address every time it
    connects, so after a failover the retry above reaches the new primary. (redis-py's own
    asks only on its first connect: a reconnect after the primary died went to the old
    address until the client was recreated: redis/redis-py#3874.) A connection to a server
    that has been demoted drops itself on READONLY (redis-py) and reconnects here. A new
    connection asks twice (redis-py's first connect, then here): connections are pooled."""

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def sentinel_url(url: str) -> SentinelUrl:
    """redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    [?sentinel_password=...]; the credentials are the primary's, Sentinel's own password
    is a query parameter. Raises ValueError."""
    parsed = urlparse(url)
    if parsed.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hosts = parsed.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":") if ":" in host else (host.strip(), "", "")
        if not name or (port and not port.isdigit()):
            raise ValueError(f"bad Sentinel address {host!r}: use host:port")
        sentinels.append((name, int(port or 26379)))
    path = [part for part in parsed.path.split("/") if part]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /service-name or /service-name/db")
    query = parse_qs(parsed.query)
    return SentinelUrl(sentinels, unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       unquote(username) or None, unquote(password) or None,
                       query.get("sentinel_password", [None])[0])
