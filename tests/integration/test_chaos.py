"""Exactly once under faults, end to end, on real processes and services: worker processes
killed mid-batch (SIGKILL) and replaced while requests keep arriving, the store dropping
their connections, gateway processes killed under clients that retry until acknowledged,
the broker and Redis frozen, an ingestion session sent through all that. Afterwards every
acknowledged event is stored once (the newest per item, for item-key datasets), and nothing
else is."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import records as r
from tests.integration.test_server import start_gateway, stop_gateway
from tests.integration.test_workers import count, rows
from tests.services import consume_all, produce

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ITEMS_PER_REQUEST = 40
BACKLOG = 800  # requests sent before the workers start
KILLS = 5  # worker processes killed


class Workers:
    """Worker processes (``python -m workers run``), one consumer each, killable one by one."""

    def __init__(self, storage_url: str, catalogue: Path, bootstrap: str, redis_url: str,
                 logs: Path):
        self.env = {**os.environ, "STORAGE_URL": storage_url,
                    "SLUICE_CATALOGUE_DIR": str(catalogue),
                    "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
                    "REDIS_URL": redis_url, "WORKER_GROUP_ID": f"chaos-{uuid.uuid4().hex[:8]}",
                    "WORKER_PROCESSES": "1", "WORKER_METRICS_PORT": "0",
                    # small batches: many commits, so a kill often lands between a write and
                    # its commit
                    "WORKER_BATCH_SIZE": "8", "WORKER_BATCH_MS": "20",
                    # a killed worker's partitions move after 3 s (Tansu also holds a new
                    # group for half of it before the first assignment)
                    "WORKER_SESSION_TIMEOUT_MS": "3000",
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

    def stop(self) -> list[int | None]:
        """SIGTERM each; the exit codes (None: killed after 30 s without stopping)."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(30))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(None)
        return codes

    def log_text(self) -> str:
        """The workers' logs: any with a traceback first and longer, then the others' ends."""
        texts = [p.read_text(errors="replace") for p in sorted(self.logs.glob("worker-*.log"))]
        failed = [t[-8000:] for t in texts if "Traceback" in t]
        return "\n".join(failed + [t[-1500:] for t in texts if "Traceback" not in t])


async def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` that has one."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                              enable_auto_commit=False)  # never subscribes: joins nothing
    await reader.start()
    try:
        offsets = {p: await reader.committed(TopicPartition(topic, p)) for p in (0, 1)}
    finally:
        await reader.stop()
    return {p: offset for p, offset in offsets.items() if offset}


async def _stored_beyond_commit(gw, storage_url: str, group: str) -> dict[int, tuple[int, int]]:
    """Partitions whose stored rows go past the group's committed offset: {partition:
    (committed, last stored offset + 1)}."""
    committed = await _committed(gw.bootstrap, gw.other_topic, group)
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
    workers = Workers(storage_url, gateway.settings.catalogue_dir, gateway.bootstrap,
                      gateway.redis_url, tmp_path)
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


@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
async def test_killed_workers_keep_the_newest_row_of_each_item(gateway, storage_url, tmp_path):
    """The item-key path (upserts, last writer wins) under the same kills: every request
    rewrites the same 40 items; afterwards each row holds the newest write by receive time,
    partition and offset, as the records in the topic say. PostgreSQL only: its merge (a
    staging table, ordered, conditional) is the one with moving parts; SQLite's is one
    conditional upsert, tested in test_sinks. Without the condition this fails about every
    other run (the two partitions' workers interleave)."""
    regions = [f"item-{i:02d}" for i in range(ITEMS_PER_REQUEST)]
    rng = random.Random(11)
    stop_pushing = asyncio.Event()

    async def push(n: int) -> None:
        body = orjson.dumps([{"region": region, "revenue": n} for region in regions])
        resp = await gateway.post(body, **{"X-Request-ID": f"lww-{n}"})
        assert resp.status == 202, await resp.text()

    async def keep_pushing(n: int) -> None:
        while not stop_pushing.is_set():
            await asyncio.gather(*(push(n + i) for i in range(4)))
            n += 4
            await asyncio.sleep(0.005)

    for first in range(0, BACKLOG // 2, 8):
        await asyncio.gather(*(push(n) for n in range(first, first + 8)))
    workers = Workers(storage_url, gateway.settings.catalogue_dir, gateway.bootstrap,
                      gateway.redis_url, tmp_path)
    pusher = asyncio.create_task(keep_pushing(BACKLOG // 2))
    try:
        workers.start()
        workers.start()
        while await count(storage_url) == 0:  # the group has formed
            await asyncio.sleep(0.05)
        for _ in range(2):
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            workers.kill_one(rng)
            workers.start()
        stop_pushing.set()
        await pusher
        published = await consume_all(gateway.bootstrap, gateway.topic, timeout=20)
        ends = {}
        for rec in published:
            ends[rec.partition] = max(ends.get(rec.partition, 0), rec.offset + 1)
        deadline = asyncio.get_running_loop().time() + 90
        group = workers.env["WORKER_GROUP_ID"]
        while await _committed(gateway.bootstrap, gateway.topic, group) != ends:
            assert asyncio.get_running_loop().time() < deadline, workers.log_text()
            await asyncio.sleep(0.5)
    finally:
        stop_pushing.set()
        await asyncio.gather(pusher, return_exceptions=True)
        exits = workers.stop()
    assert exits == [0, 0], workers.log_text()
    newest = max(published, key=lambda rec: (int(dict(rec.headers)[r.H_RECEIVED_AT]),
                                             rec.partition, rec.offset))
    expected = {e["region"]: e["revenue"] for e in orjson.loads(newest.value)}
    stored = await rows(storage_url, "SELECT region, revenue FROM sales")
    assert dict(stored) == expected
    assert len(published) > BACKLOG // 2


class RetryingClients:
    """Clients that send requests one after another, each retried with the same
    Idempotency-Key and body until it is acknowledged (as Stripe's clients do), as long as
    ``stop`` is not set."""

    def __init__(self, url: str, key: str, concurrency: int = 16):
        self.url, self.key, self.concurrency = url, key, concurrency
        self.attempts: Counter = Counter()  # request id -> attempts
        self.refusals: Counter = Counter()  # status (0: connection lost) -> times
        self.acknowledged: set[str] = set()
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, n: int) -> None:
        while not self.stop.is_set():
            request_id = f"retried-{n}"
            body = orjson.dumps([{"n": n, "i": i} for i in range(ITEMS_PER_REQUEST)])
            headers = {"Authorization": f"Bearer {self.key}", "X-Request-ID": request_id,
                       "Content-Type": "application/json", "Idempotency-Key": request_id}
            delay = 0.05
            while True:
                self.attempts[request_id] += 1
                try:
                    async with session.post(self.url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status == 202:
                            break
                        assert resp.status in (409, 503), (resp.status, await resp.text())
                        self.refusals[resp.status] += 1
                except aiohttp.ClientError:
                    self.refusals[0] += 1  # the process died under the request
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            self.acknowledged.add(request_id)
            n += self.concurrency


async def _stored_once(clients: RetryingClients, storage_url: str, catalogue: Path,
                       bootstrap: str, redis_url: str, logs: Path) -> None:
    """A worker drains the topic; every acknowledged request is then stored exactly once,
    and nothing else is."""
    assert clients.acknowledged == set(clients.attempts)
    workers = Workers(storage_url, catalogue, bootstrap, redis_url, logs)
    workers.start()
    try:
        expected = len(clients.acknowledged) * ITEMS_PER_REQUEST
        deadline = asyncio.get_running_loop().time() + 60
        while (stored := await count(storage_url, "other")) < expected:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{stored} of {expected} rows\n" + workers.log_text())
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
    finally:
        exits = workers.stop()
    assert exits == [0]
    stored_rows = await rows(storage_url, "SELECT _request_id, count(*), count(DISTINCT _index) "
                                          "FROM other GROUP BY _request_id")
    assert {rid: (n, d) for rid, n, d in stored_rows} == {
        rid: (ITEMS_PER_REQUEST, ITEMS_PER_REQUEST) for rid in clients.acknowledged}


async def _kill_served_processes(proc: subprocess.Popen, kills: int) -> None:
    """SIGKILL one of the served gateway's processes (its supervisor replaces it) each
    second, ``kills`` times, then wait a second more."""
    for n in range(kills):
        await asyncio.sleep(1.0)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        os.kill(int(random.Random(n).choice(children)), signal.SIGKILL)
    await asyncio.sleep(1.0)


async def test_killed_gateway_processes_lose_nothing_a_retrying_client_sent(
        tmp_path, kafka, redis_url, postgres_url):
    """Gateway processes SIGKILLed under retrying clients: every request ends acknowledged
    and stored exactly once, whether its first attempt died before or after publishing (then
    the retry publishes it again once the claim's lock TTL has passed, and the workers drop
    the second copy by its Idempotency-Key)."""
    proc, base, key, _ = await start_gateway(
        tmp_path, kafka.bootstrap, redis_url, 2, dataset="other",
        SLUICE_IDEMPOTENCY_LOCK_TTL_S="2", KAFKA_PUBLISH_TIMEOUT_S="1")
    clients = RetryingClients(f"{base}/v1/datasets/other/events", key)
    sending = asyncio.create_task(clients.run())
    await _kill_served_processes(proc, 4)
    clients.stop.set()
    await asyncio.wait_for(sending, 60)
    assert stop_gateway(proc) == (0, [])  # its replacements stopped too
    assert clients.refusals[0] > 0  # requests were cut off by the kills
    await _stored_once(clients, postgres_url, tmp_path, kafka.bootstrap, redis_url, tmp_path)


async def test_frozen_broker_and_redis_lose_nothing_a_retrying_client_sent(
        tmp_path, own_broker, own_redis, postgres_url):
    """The broker, then Redis, stop answering for a while under retrying clients: requests
    get 503 (their claims released), and once both are back every request is acknowledged
    and stored exactly once, also those whose publish landed after their 503."""
    broker, redis = own_broker(), own_redis()
    proc, base, key, _ = await start_gateway(
        tmp_path, broker.bootstrap, redis.url, 1, dataset="other",
        SLUICE_IDEMPOTENCY_LOCK_TTL_S="2", KAFKA_PUBLISH_TIMEOUT_S="1", REDIS_TIMEOUT_S="0.5")
    clients = RetryingClients(f"{base}/v1/datasets/other/events", key)
    sending = asyncio.create_task(clients.run())
    try:
        for service in (broker, redis):
            await asyncio.sleep(1.0)
            service.pause()
            await asyncio.sleep(2.5)
            service.resume()
        await asyncio.sleep(1.5)
    finally:
        broker.resume()
        redis.resume()
        clients.stop.set()
        await asyncio.wait_for(sending, 60)
    assert stop_gateway(proc) == (0, [])
    assert clients.refusals[503] > 0
    await _stored_once(clients, postgres_url, tmp_path, broker.bootstrap, redis.url, tmp_path)


async def test_a_session_sent_through_killed_gateway_processes_completes_with_every_chunk_once(
        tmp_path, kafka, redis_url, postgres_url):
    """Ingestion sessions under the same kills: chunks retried with their Idempotency-Key
    until answered 201, the session closed, then drained: it becomes complete, every chunk's
    records are stored once and its counts are exact (a chunk cut off after its publish is
    published again by its retry once its claim lapses, and dropped by the workers)."""
    proc, base, key, _ = await start_gateway(
        tmp_path, kafka.bootstrap, redis_url, 2, dataset="other",
        SLUICE_IDEMPOTENCY_LOCK_TTL_S="2", KAFKA_PUBLISH_TIMEOUT_S="1")
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    stop = asyncio.Event()
    answered: set[str] = set()
    cut_off = Counter()

    async def until_answered(session, method: str, url: str, body: bytes, expected: int,
                             **headers: str) -> dict:
        delay = 0.05
        while True:
            try:
                async with session.request(method, url, data=body,
                                           headers={**auth, **headers}) as resp:
                    if resp.status == expected:
                        return await resp.json()
                    assert resp.status in (409, 503), (resp.status, await resp.text())
            except aiohttp.ClientError:
                cut_off[method] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def chunks(session, ingestion: str, n: int) -> None:
        while not stop.is_set():
            chunk = f"chunk-{n}"
            body = orjson.dumps([{"n": n, "i": i} for i in range(ITEMS_PER_REQUEST)])
            await until_answered(session, "POST", f"{base}/v1/ingestions/{ingestion}/chunks",
                                 body, 201, **{"Idempotency-Key": chunk, "X-Request-ID": chunk})
            answered.add(chunk)
            n += 8

    async with aiohttp.ClientSession() as session:
        opened = await until_answered(session, "POST", f"{base}/v1/ingestions",
                                      orjson.dumps({"dataset": "other"}), 201,
                                      **{"Idempotency-Key": "open-chaos"})
        ingestion = opened["ingestion_id"]
        senders = [asyncio.create_task(chunks(session, ingestion, i)) for i in range(8)]
        await _kill_served_processes(proc, 3)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*senders), 60)
        await until_answered(session, "PATCH", f"{base}/v1/ingestions/{ingestion}",
                             orjson.dumps({"status": "closed"}), 200)
        assert cut_off["POST"] > 0  # chunks were cut off by the kills
        workers = Workers(postgres_url, tmp_path, kafka.bootstrap, redis_url, tmp_path)
        workers.start()
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                async with session.get(f"{base}/v1/ingestions/{ingestion}",
                                       headers=auth) as resp:
                    state = await resp.json()
                if state.get("complete"):
                    break
                assert asyncio.get_running_loop().time() < deadline, (state,
                                                                      workers.log_text())
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
        finally:
            exits = workers.stop()
    assert stop_gateway(proc) == (0, [])
    assert exits == [0]
    assert state["status"] == "closed" and state["chunks_in_flight"] == 0
    stored_rows = await rows(postgres_url, "SELECT _request_id, count(*), count(DISTINCT _index) "
                                           "FROM other GROUP BY _request_id")
    assert {rid: (n, d) for rid, n, d in stored_rows} == {
        chunk: (ITEMS_PER_REQUEST, ITEMS_PER_REQUEST) for chunk in answered}
    # exact, also for a chunk counted by a process that died before storing its answer: its
    # retry publishes it again, is not counted again, and the workers drop the second copy
    expected = len(answered) * ITEMS_PER_REQUEST
    assert (state["chunks"], state["items_accepted"], state["items_written"]) == (
        len(answered), expected, expected)
