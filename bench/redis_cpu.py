"""Redis's CPU per request, by part: the gateway's own admission, stored-answer and accounting
calls (its Admitter and Accountant, as they batch under load) against a redis-server of its
own, and nothing else on that server.

    python -m bench.redis_cpu [--requests 100000] [--concurrency 16]

One Redis primary serves every gateway of a deployment, so its CPU per request bounds the
deployment's requests per second (events per request do not matter to it). End-to-end runs
cannot see a change of a few per cent in a Lua script; this measures the scripts alone. Each
part runs on its own and is measured by Redis's own ``used_cpu_user`` and ``used_cpu_sys``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import redis

from gateway.accounting import Accountant, RequestOutcome
from gateway.admission import Admitter
from gateway.scripts import ScriptBatcher
from schemas import outcomes as o
from schemas import redis_client, redis_keys
from schemas.dataset import RateLimit
from tests.services import RedisServer

DATASET, KEY_ID, CONNECTOR = "sales", "bench", "bench"
RATE = RateLimit(1_000_000, 1_000_000)  # on, as in `make bench`, never refusing
ANSWER = (b'{"request_id":"req_0123456789abcdef01234567","dataset":"sales",'
          b'"items_received":1,"items_accepted":1}')


def _cpu(info: dict[str, Any]) -> float:
    return info["used_cpu_user"] + info["used_cpu_sys"]


async def measure(url: str, requests: int, concurrency: int) -> dict[str, float]:
    """Redis CPU in us per request of each part, ``concurrency`` requests per loop turn."""
    client = redis_client.connect(url, 5)
    scripts = ScriptBatcher(client)
    admitter = Admitter(scripts, lock_ttl_s=60, retention_s=86_400)
    # flushed by hand below, every 50 ms of requests at about 5,000 requests/s: 250 a flush
    accountant = Accountant(client)
    probe = redis.Redis.from_url(url)
    bucket = redis_keys.rate_bucket_key(DATASET, KEY_ID)
    ids = [f"req_{n:024d}" for n in range(requests)]
    idem = [redis_keys.idempotency_key(DATASET, KEY_ID, f"key-{n}") for n in range(requests)]
    now = int(time.time() * 1000)
    # the request log at its cap first, so that every entry trims one, as under steady load
    for n in range(0, o.LOG_MAX_ENTRIES, 250):
        for i in range(n, n + 250):
            accountant.record(RequestOutcome(DATASET, CONNECTOR, f"old_{i}", now, 202,
                                             received=1, accepted=1, bytes=115))
        await accountant.flush()

    async def admit(n: int) -> None:
        await admitter.admit(bucket, RATE, idem[n], "f" * 64, ids[n])

    async def complete(n: int) -> None:
        await admitter.complete(idem[n], ids[n], 202, ANSWER)

    async def account(n: int) -> None:
        accountant.record(RequestOutcome(DATASET, CONNECTOR, ids[n], now + n, 202,
                                         received=1, accepted=1, bytes=115))
        if n % 250 == 249:
            await accountant.flush()

    parts: dict[str, float] = {}
    for name, step in (("admission", admit), ("stored answer", complete),
                       ("request log and statistics", account)):
        before = _cpu(probe.info("cpu"))
        for first in range(0, requests, concurrency):
            await asyncio.gather(*(step(n) for n in range(first, min(first + concurrency,
                                                                      requests))))
        await accountant.flush()
        parts[name] = (_cpu(probe.info("cpu")) - before) / requests * 1e6
    await scripts.close()
    await client.aclose()
    probe.close()
    return parts


def run(requests: int = 100_000, concurrency: int = 16) -> dict[str, float]:
    """Each part's Redis CPU in us per request, and their total, on a server of its own."""
    with RedisServer() as server:  # started
        parts = asyncio.run(measure(server.url, requests, concurrency))
    return {**{name: round(us, 1) for name, us in parts.items()},
            "total": round(sum(parts.values()), 1)}


def lines(parts: dict[str, float]) -> list[str]:
    per_core = f"about {1e6 / parts['total']:,.0f} requests/s per Redis core"
    return [*(f"  {name:<28} {us:6.1f} us" for name, us in parts.items()), f"  {'':<28} {per_core}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="requests per event-loop turn (batched into one script call)")
    args = parser.parse_args()
    parts = run(args.requests, args.concurrency)
    print(f"Redis CPU per request ({args.concurrency} requests per loop turn):")
    print("\n".join(lines(parts)))


if __name__ == "__main__":
    main()
