"""Prometheus metrics: what each request's fate adds, and sums across gateway processes."""

from __future__ import annotations

import signal

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_push import ITEMS
from tests.integration.test_server import post, start_gateway

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
