"""Prometheus metrics: what each request's fate adds, and sums across gateway processes."""

from __future__ import annotations

import signal

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_push import ITEMS
from tests.integration.test_server import post, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return samples(await resp.text())


async def test_fates_are_counted_with_bounded_labels(make_gateway):
    gw = await make_gateway(rate_limit={"requests_per_second": 0.1, "burst": 3})
    before = await scrape(gw.client)
    route = "/v1/datasets/{dataset}/events"
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202
    assert (await gw.post(orjson.dumps([{"revenue": 1}]))).status == 400
    assert (await gw.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "m"})).status == 202
    assert (await gw.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "m"})).status == 429
    assert (await gw.post(orjson.dumps(ITEMS), dataset="nope")).status == 404
    after = await scrape(gw.client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sluice_http_requests_total", dataset="sales", route=route, status="202") == 2
    assert delta("sluice_http_requests_total", dataset="sales", route=route, status="400") == 1
    assert delta("sluice_http_requests_total", dataset="sales", route=route, status="429") == 1
    assert delta("sluice_http_requests_total", dataset="unknown", route=route, status="404") == 1
    assert delta("sluice_events_total", dataset="sales", outcome="accepted") == 4
    assert delta("sluice_events_total", dataset="sales", outcome="rejected") == 1
    assert delta("sluice_rate_limited_total", dataset="sales") == 1
    assert delta("sluice_kafka_publish_duration_seconds_count") == 2
    assert delta("sluice_http_request_duration_seconds_count", route=route) == 5
    assert delta("sluice_request_body_bytes_count", dataset="sales") >= 3
    for name, labels in after:
        assert not any(k in ("request_id", "key", "connector") for k, _ in labels), name


async def test_counts_sum_across_processes(tmp_path, kafka, redis_url):
    proc, base, key, _ = await start_gateway(tmp_path, kafka.bootstrap, redis_url, 2)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(30):
                async with post(s, base, key, orjson.dumps(ITEMS)) as resp:
                    assert resp.status == 202
            seen = set()
            for _ in range(10):  # whichever process answers the scrape sees all of them
                async with s.get(base + "/metrics") as resp:
                    metrics = samples(await resp.text())
                seen.add(value(metrics, "sluice_http_requests_total", dataset="sales",
                               route="/v1/datasets/{dataset}/events", status="202"))
        assert seen == {30.0}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_one_process_with_a_metrics_directory_that_does_not_exist_yet(
        tmp_path, kafka, redis_url):
    """prometheus-client writes to PROMETHEUS_MULTIPROC_DIR whenever it is set, one process
    or many; the gateway creates it (it failed to start with FileNotFoundError)."""
    directory = tmp_path / "not" / "yet" / "there"
    (tmp_path / "catalogue").mkdir()
    proc, base, key, _ = await start_gateway(tmp_path / "catalogue", kafka.bootstrap, redis_url,
                                             1, PROMETHEUS_MULTIPROC_DIR=str(directory))
    try:
        async with aiohttp.ClientSession() as s:
            async with post(s, base, key, orjson.dumps(ITEMS)) as resp:
                assert resp.status == 202
            async with s.get(base + "/metrics") as resp:
                metrics = samples(await resp.text())
        assert value(metrics, "sluice_http_requests_total", dataset="sales",
                     route="/v1/datasets/{dataset}/events", status="202") == 1.0
        assert any(directory.glob("counter_*.db"))
    finally:
        assert stop_gateway(proc) == (0, [])


async def test_worker_metrics_follow_the_batch(gateway, tmp_path):
    from prometheus_client import REGISTRY

    from tests.integration.test_workers import Running, _equals, count, wait_for
    from tests.services import produce

    def now(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    storage = f"sqlite:///{tmp_path}/m.db"
    written = now("sluice_worker_records_written_total", dataset="sales")
    dead = now("sluice_worker_dead_lettered_total", dataset="sales")
    assert (await gateway.post(orjson.dumps(ITEMS))).status == 202
    await produce(gateway.bootstrap, gateway.topic, b'{"region": "x", "revenue": "lots"}')
    async with Running(gateway, storage):
        await wait_for(lambda: _equals(count(storage), 2))
        await wait_for(lambda: _dead_lettered(now, dead + 1))
    assert now("sluice_worker_records_written_total", dataset="sales") - written == 2
    assert now("sluice_worker_last_commit_timestamp_seconds") > 0
    assert now("sluice_worker_batch_duration_seconds_count") >= 1
    lags = [now("sluice_worker_consumer_lag", topic=gateway.topic, partition=str(p))
            for p in range(2)]
    assert lags == [0.0, 0.0]


async def _dead_lettered(now, expected):
    return now("sluice_worker_dead_lettered_total", dataset="sales") == expected


async def test_each_side_exports_only_its_own_metrics(gateway):
    from schemas.metrics_export import exposition

    assert (await gateway.post(orjson.dumps(ITEMS))).status == 202
    served = await scrape(gateway.client)
    names = {name for name, _ in served}
    assert "sluice_http_requests_total" in names and "sluice_gateway_ready" in names
    assert not [n for n in names if n.startswith("sluice_worker_")]
    worker = samples(exposition("worker")[0].decode())
    worker_names = {name for name, _ in worker}
    assert "sluice_worker_last_commit_timestamp_seconds" in worker_names
    assert not [n for n in worker_names if n.startswith("sluice_") and
                not n.startswith("sluice_worker_")]
