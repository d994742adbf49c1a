"""The Redis client's connections pack commands with hiredis, to the same bytes as redis-py."""

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from schemas import redis_client

ARGUMENTS = [
    ("EVALSHA", "0" * 40, 2, "sluice:rate:{d/sales/k}", b"\x00\xff", 1.0 / 3, 0.1, 1e20, 1e-7,
     float("inf"), -5, 2**70, "é ü", ""),
    ("SCRIPT LOAD", "return 1"),  # a two-word command name, split as redis-py does
    (b"CONFIG GET", "maxmemory"),
    ("SET", "k", "v" * 200_000),  # over redis-py's buffer cutoff: it sends it in pieces
    ("SET", "k", memoryview(b"view")),  # hiredis refuses these: redis-py's own packer
    ("SET", "k", bytearray(b"array")),
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=lambda args: str(args[0]))
def test_same_bytes_as_redis_py(args):
    ours = redis_client._Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("value", [None, True, object()])
def test_refuses_what_redis_py_refuses(value):
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        redis_client._Connection().pack_command("SET", "k", value)


@pytest.mark.parametrize("url, theirs", [
    ("redis://127.0.0.1:6379/0", Connection),
    ("rediss://127.0.0.1:6380/0", SSLConnection),
    ("unix:///run/redis.sock", UnixDomainSocketConnection),
])
def test_every_scheme_gets_a_hiredis_packing_connection(url, theirs):
    client = redis_client.connect(url, 1.0)
    cls = client.connection_pool.connection_class
    assert issubclass(cls, theirs) and issubclass(cls, redis_client._HiredisPacking)


def test_sentinel_connections_pack_with_hiredis():
    client = redis_client.connect("redis+sentinel://127.0.0.1:26379/sluice", 1.0)
    assert issubclass(client.connection_pool.connection_class, redis_client._HiredisPacking)
