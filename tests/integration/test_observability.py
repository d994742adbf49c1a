"""Operability: the readiness gauge, and a real Prometheus scraping a gateway and a worker."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.integration.test_metrics import samples, value
from tests.integration.test_push import ITEMS, assert_problem
from tests.integration.test_server import ROOT, post, start_gateway
from tests.integration.test_workers import wait_for
from tests.services import PrometheusServer, free_port, produce
from tests.unit.test_alert_rules import ALERTS, dashboard_queries, rule_groups

pytestmark = pytest.mark.integration


async def _ready_gauge(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(base + "/metrics") as resp:
        assert resp.status == 200
        return value(samples(await resp.text()), "sluice_gateway_ready")


async def test_ready_gauge_follows_the_broker(tmp_path, own_broker, redis_url):
    broker = own_broker()
    proc, base, _, _ = await start_gateway(tmp_path, broker.bootstrap, redis_url, 2)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for(lambda: _is(_ready_gauge(session, base), 1.0), timeout=15)
            broker.stop()
            await wait_for(lambda: _is(_ready_gauge(session, base), 0.0), timeout=20)
            async with session.get(base + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["checks"]["kafka"] != "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def _is(pending, expected: float) -> bool:
    return await pending == expected


# --- a real Prometheus scraping a gateway and a worker under load ---------------------------

RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval would be with a short scrape interval

# Label values some panels must show after the load below (panel title, label): values.
EXPECTED = {
    ("Errors/s by dataset and status", "status"): {"400", "429", "503"},
    ("Rate-limited and replayed requests/s", "dataset"): {"sales"},
    ("Dead-lettered events/s by dataset", "dataset"): {"sales"},
    ("Kafka publish errors/s by reason", "reason"): {"timeout"},
    ("Redis errors/s by operation", "operation"): {"admit"},
    ("Gateway ready and targets up", "job"): {"sluice-gateway", "sluice-workers"},
}


def concrete(expr: str) -> str:
    """A dashboard query as Grafana would send it with every dataset selected."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$dataset", ".*")


def start_worker(directory: Path, bootstrap: str, redis_url: str) -> tuple[subprocess.Popen, int]:
    """``python -m workers run`` on the gateway's catalogue, SQLite in ``directory``."""
    port = free_port()
    env = {**os.environ, "STORAGE_URL": f"sqlite:///{directory}/observed.db",
           "SLUICE_CATALOGUE_DIR": str(directory), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "KAFKA_ENABLE_IDEMPOTENCE": "false", "REDIS_URL": redis_url,
           "WORKER_GROUP_ID": f"observed-{uuid.uuid4().hex[:8]}", "WORKER_BATCH_MS": "50",
           "WORKER_METRICS_PORT": str(port)}
    with open(directory / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "run"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, port


async def _steady(session, base: str, key: str, stop: asyncio.Event) -> Counter:
    statuses: Counter = Counter()
    while not stop.is_set():
        async with post(session, base, key, orjson.dumps(ITEMS)) as resp:
            statuses[resp.status] += 1
        await asyncio.sleep(0.1)
    return statuses


async def _one_of_each(session, base: str, key: str, broker, redis, topic: str) -> None:
    """A 400, an idempotent replay, 429s, a dead letter, a publish timeout, a Redis failure."""
    async with post(session, base, key, orjson.dumps([{"revenue": 1}])) as resp:
        await assert_problem(resp, 400, "VALIDATION_FAILED")
    for replayed in (False, True):
        async with post(session, base, key, orjson.dumps(ITEMS[:1]),
                        **{"Idempotency-Key": "observed"}) as resp:
            assert resp.status == 202
            assert (resp.headers.get("Idempotent-Replayed") == "true") is replayed
    statuses: list[int] = []
    for _ in range(5):  # bursts over the 20/s bucket until one is refused
        statuses += await asyncio.gather(*(_status(session, base, key) for _ in range(40)))
        if 429 in statuses:
            break
    assert set(statuses) == {202, 429}
    await asyncio.sleep(1.5)  # the bucket refills (20/s)
    await produce(broker.bootstrap, topic, b'{"region": "x", "revenue": "lots"}')
    for service, code in ((broker, "BROKER_UNAVAILABLE"), (redis, "REDIS_UNAVAILABLE")):
        service.pause()
        try:
            async with post(session, base, key, orjson.dumps(ITEMS[1:])) as resp:
                await assert_problem(resp, 503, code)
        finally:
            service.resume()


async def _status(session, base: str, key: str) -> int:
    async with post(session, base, key, orjson.dumps(ITEMS[1:])) as resp:
        return resp.status


async def _missing_data(prometheus: PrometheusServer) -> list[str]:
    """Dashboard queries that return no finite value (or lack an expected label value)."""
    missing = []
    for title, expr in dashboard_queries():
        result = await asyncio.to_thread(prometheus.query, concrete(expr))
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite:
            missing.append(f"{title}: {expr}")
    for (title, label), wanted in EXPECTED.items():
        seen = set()
        for panel_title, expr in dashboard_queries():
            if panel_title == title:
                result = await asyncio.to_thread(prometheus.query, concrete(expr))
                seen |= {r["metric"][label] for r in result if label in r["metric"]}
        if not wanted <= seen:
            missing.append(f"{title}: {label} {sorted(wanted - seen)} not among {sorted(seen)}")
    return missing


async def _gateway_ready(prometheus: PrometheusServer) -> bool:
    result = await asyncio.to_thread(prometheus.query, 'sluice_gateway_ready{job="sluice-gateway"}')
    return [r["value"][1] for r in result] == ["1"]


async def _rules_evaluated(prometheus: PrometheusServer) -> list[dict] | None:
    groups = (await asyncio.to_thread(prometheus.api, "rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return groups if rules and all(r["health"] != "unknown" for r in rules) else None


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        tmp_path, own_broker, own_redis, monkeypatch):
    for name, setting in {"SLUICE_RATE_LIMIT_RPS": "20", "SLUICE_RATE_LIMIT_BURST": "20",
                          "KAFKA_PUBLISH_TIMEOUT_S": "1", "REDIS_TIMEOUT_S": "0.5"}.items():
        monkeypatch.setenv(name, setting)  # start_gateway passes its environment on
    broker, redis = own_broker(), own_redis()
    gateway, base, key, topic = await start_gateway(tmp_path, broker.bootstrap, redis.url, 2)
    worker, worker_port = start_worker(tmp_path, broker.bootstrap, redis.url)
    prometheus = PrometheusServer({"sluice-gateway": [base.removeprefix("http://")],
                                   "sluice-workers": [f"127.0.0.1:{worker_port}"]},
                                  rule_files=[ALERTS])
    try:
        prometheus.start()
        async with aiohttp.ClientSession() as session:
            stop = asyncio.Event()
            steady = asyncio.create_task(_steady(session, base, key, stop))
            try:
                await _one_of_each(session, base, key, broker, redis, topic)
                deadline = time.monotonic() + 40
                while (missing := await _missing_data(prometheus)) and time.monotonic() < deadline:
                    await asyncio.sleep(1)
            finally:
                stop.set()
                statuses = await steady
        assert missing == [], "\n".join(missing)
        assert statuses[202] >= 10 and set(statuses) <= {202, 429, 503}, statuses
        await wait_for(lambda: _gateway_ready(prometheus), timeout=15)  # again, after the pauses
        groups = await wait_for(lambda: _rules_evaluated(prometheus), timeout=10)
        assert [g["name"] for g in groups] == ["sluice"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert len(loaded) == sum(len(rules) for rules in rule_groups().values())
        assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded.values())
    finally:
        prometheus.close()
        for proc in (worker, gateway):
            proc.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert gateway.wait(30) == 0

