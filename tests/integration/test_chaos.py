"""Exactly once under faults, end to end: requests keep arriving while worker processes are
killed (SIGKILL, mid-batch) and replaced, and the store drops their connections; afterwards
every acknowledged event is stored once, and nothing else is."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import records as r
from tests.integration.test_workers import count, rows
from tests.services import consume_all, produce

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ITEMS_PER_REQUEST = 40
BACKLOG = 800  # requests sent before the workers start
KILLS = 5  # worker processes killed


class Workers:
    """Worker processes (``python -m workers run``), one consumer each, killable one by one."""

    def __init__(self, gw, storage_url: str, logs: Path):
        self.env = {**os.environ, "STORAGE_URL": storage_url,
                    "SLUICE_CATALOGUE_DIR": str(gw.settings.catalogue_dir),
                    "KAFKA_BOOTSTRAP_SERVERS": gw.bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
                    "REDIS_URL": gw.redis_url, "WORKER_GROUP_ID": f"chaos-{uuid.uuid4().hex[:8]}",
                    "WORKER_PROCESSES": "1", "WORKER_METRICS_PORT": "0",
                    # small batches: many commits, so a kill often lands between a write and
                    # its commit
                    "WORKER_BATCH_SIZE": "8", "WORKER_BATCH_MS": "20",
                    "SLUICE_LOG_FORMAT": "text"}
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        self.started = 0

    def start(self) -> None:
        self.started += 1
        with open(self.logs / f"worker-{self.started}.log", "wb") as out:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "workers", "run"],
                                               env=self.env, cwd=ROOT, stdout=out,
                                               stderr=subprocess.STDOUT))

    def kill_one(self, rng: random.Random) -> None:
        victim = self.procs.pop(rng.randrange(len(self.procs)))
        victim.send_signal(signal.SIGKILL)
        victim.wait()

    def stop(self) -> list[int]:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        return [proc.wait(30) for proc in self.procs]

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:]
                         for p in sorted(self.logs.glob("worker-*.log")))


async def _stored_beyond_commit(gw, storage_url: str, group: str) -> dict[int, tuple[int, int]]:
    """Partitions whose stored rows go past the group's committed offset: {partition:
    (committed, last stored offset + 1)}."""
    reader = AIOKafkaConsumer(bootstrap_servers=gw.bootstrap, group_id=group,
                              enable_auto_commit=False)  # never subscribes: joins nothing
    await reader.start()
    try:
        committed = {p: await reader.committed(TopicPartition(gw.other_topic, p)) or 0
                     for p in (0, 1)}
    finally:
        await reader.stop()
    stored = await rows(storage_url, "SELECT _partition, max(_offset) + 1 FROM other "
                                     "GROUP BY _partition")
    return {p: (committed.get(p, 0), end) for p, end in stored if end > committed.get(p, 0)}


async def _drop_store_connections(storage_url: str) -> int:
    """Terminate every other connection to this test's database (as a failover would)."""
    conn = await asyncpg.connect(storage_url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t")
    finally:
        await conn.close()


async def test_killed_workers_and_dropped_connections_store_every_acknowledged_event_once(
        make_gateway, own_redis, storage_url, tmp_path):
    redis = own_redis()  # frozen once below
    gateway = await make_gateway(redis=redis.url)
    rng = random.Random(7)
    acknowledged: dict[str, int] = {}  # request id -> items
    keyed: list[str] = []  # request ids sent with an Idempotency-Key
    pushing = asyncio.Event()
    pushing.set()

    async def push(n: int) -> None:
        request_id = f"chaos-{n}"
        items = [{"n": n, "i": i, "pad": "x" * 40} for i in range(ITEMS_PER_REQUEST)]
        headers = {"X-Request-ID": request_id}
        if n % 2:
            headers["Idempotency-Key"] = f"idem-{n}"
        resp = await gateway.post(orjson.dumps(items), key=gateway.other_key, dataset="other",
                                  **headers)
        assert resp.status == 202, await resp.text()
        acknowledged[request_id] = ITEMS_PER_REQUEST
        if n % 2:
            keyed.append(request_id)

    paused = asyncio.Event()

    async def keep_pushing(n: int) -> None:
        while True:
            if not pushing.is_set():
                paused.set()
                await pushing.wait()
                paused.clear()
            await asyncio.gather(*(push(n + i) for i in range(4)))
            n += 4
            await asyncio.sleep(0.005)

    async def pause_pushing() -> None:
        pushing.clear()
        await paused.wait()

    # a backlog first, so that the workers are busy when they are killed
    for first in range(0, BACKLOG, 8):
        await asyncio.gather(*(push(n) for n in range(first, first + 8)))
    workers = Workers(gateway, storage_url, tmp_path)
    pusher = asyncio.create_task(keep_pushing(BACKLOG))
    try:
        workers.start()
        workers.start()
        while await count(storage_url, "other") == 0:  # the group has formed
            await asyncio.sleep(0.05)
        # Kills between a batch's write and its offset commit, for certain: with Redis frozen,
        # the workers store the batch they hold and then wait to record its statistics, which
        # comes before the commit. Both are killed there.
        await pause_pushing()
        redis.pause()
        await asyncio.sleep(0.5)
        ahead = await _stored_beyond_commit(gateway, storage_url, workers.env["WORKER_GROUP_ID"])
        workers.kill_one(rng)
        workers.kill_one(rng)
        redis.resume()
        assert ahead, "no batch was stored and left uncommitted"
        workers.start()
        workers.start()
        pushing.set()
        drops = 0
        for _ in range(KILLS - 2):  # then at random moments, while requests keep coming
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            workers.kill_one(rng)
            workers.start()
            if storage_url.startswith("postgresql"):
                await asyncio.sleep(rng.uniform(0.1, 0.3))
                drops += await _drop_store_connections(storage_url)
        await pause_pushing()
        # A request published twice (its answer was lost, its claim expired, the client
        # retried): the same records again, through the other partition. Stored once.
        published = await consume_all(gateway.bootstrap, gateway.other_topic, timeout=20)
        again = [rec for rec in published
                 if dict(rec.headers).get(r.H_REQUEST_ID, b"").decode() in keyed[:20]]
        assert len(again) == 20
        for rec in again:
            await produce(gateway.bootstrap, gateway.other_topic, rec.value,
                          list(rec.headers), key=str(1 - rec.partition).encode())
        expected = sum(acknowledged.values())
        deadline = asyncio.get_running_loop().time() + 90
        while (stored := await count(storage_url, "other")) < expected:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{stored} of {expected} rows after 90 s\n" + workers.log_text())
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)  # the redelivered and republished records: nothing more
    finally:
        redis.resume()
        pusher.cancel()
        await asyncio.gather(pusher, return_exceptions=True)
        exits = workers.stop()
    assert exits == [0, 0], workers.log_text()
    assert drops > 0 or storage_url.startswith("sqlite")
    stored_rows = await rows(storage_url, "SELECT _request_id, count(*), count(DISTINCT _index) "
                                          "FROM other GROUP BY _request_id")
    per_request = {request_id: (n, distinct) for request_id, n, distinct in stored_rows}
    assert set(per_request) == set(acknowledged)
    wrong = [(rid, per_request[rid]) for rid, items in acknowledged.items()
             if per_request[rid] != (items, items)]
    assert not wrong, wrong[:5]
    assert len(acknowledged) > BACKLOG
    # Statistics are written after the store commits and before the offsets are: each
    # redelivery the fences dropped counts as a duplicate (the republished records, and the
    # batches the frozen workers had stored), and ``written`` never counts a row twice. A worker
    # killed between its store commit and its statistics leaves that batch counted only as
    # duplicates: at most one batch short per killed worker.
    resp = await gateway.client.get("/v1/datasets/other/stats",
                                    headers={"Authorization": f"Bearer {gateway.other_key}"})
    totals = (await resp.json())["totals"]
    batch_events = int(workers.env["WORKER_BATCH_SIZE"]) * ITEMS_PER_REQUEST
    assert expected - KILLS * batch_events <= totals["written"] <= expected
    assert totals["written"] + totals["duplicates"] >= expected + len(again) * ITEMS_PER_REQUEST
    assert totals["duplicates"] >= len(again) * ITEMS_PER_REQUEST + ITEMS_PER_REQUEST
