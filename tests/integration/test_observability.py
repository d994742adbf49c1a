"""Operability: the readiness gauge, and a real Prometheus scraping a gateway and a worker."""

from __future__ import annotations

import signal

import aiohttp
import pytest

from tests.integration.test_metrics import samples, value
from tests.integration.test_server import start_gateway
from tests.integration.test_workers import wait_for

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
