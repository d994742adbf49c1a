"""GET /healthz (alive), GET /readyz (Redis, Kafka and catalogue usable), GET /metrics.

The same readiness checks also run every READY_CHECK_INTERVAL_S in each gateway process and
set the ``sluice_gateway_ready`` gauge, so Prometheus can alert on a gateway that is up but
cannot take events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from gateway.protocol import add_routes
from gateway.state import STATE, State
from schemas import metrics
from schemas.metrics_export import exposition
from schemas.periodic import Periodic

log = logging.getLogger(__name__)

READY_CHECK_INTERVAL_S = 5.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readiness(state: State) -> tuple[bool, dict[str, str]]:
    """Whether this process can take events now, and what each check found."""
    try:
        async with asyncio.timeout(state.settings.redis_timeout_s):
            redis_ok = bool(await state.redis.ping())
        redis_detail = "ok"
    except (RedisError, TimeoutError) as exc:
        redis_ok, redis_detail = False, f"unreachable: {type(exc).__name__}"
    catalogue = state.catalogue
    topics = [d.entry_topic for d in catalogue]
    # an entry topic a reload brought is not required: a dataset added before its topic
    # would take every gateway out of its load balancer at once, for all datasets (its
    # pushes get 503 TOPIC_NOT_FOUND until the topic exists, as at start)
    kafka_ok, kafka_detail = await state.publisher.ready(
        topics, optional=[t for t in topics if t not in state.start_topics])
    checks = {
        "redis": redis_detail,
        "kafka": kafka_detail,
        "catalogue": f"{len(catalogue)} datasets" + (
            "; its files changed and failed to load (see the log): still serving this one"
            if state.reload_failed else ""),
    }
    ready = redis_ok and kafka_ok and len(catalogue) > 0
    metrics.GATEWAY_READY.set(1 if ready else 0)
    return ready, checks


async def readyz(request: web.Request) -> web.Response:
    ready, checks = await readiness(request.app[STATE])
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def _check_readiness(state: State) -> None:
    try:
        await readiness(state)
    except Exception:  # a check that broke unexpectedly must not freeze the gauge at 1
        log.exception("readiness check failed")
        metrics.GATEWAY_READY.set(0)


async def readiness_gauge(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: keep ``sluice_gateway_ready`` fresh while the application runs.

    Needs the application's State, so it must come after the context that creates it.
    """
    state = app[STATE]
    watcher = Periodic(lambda: _check_readiness(state), READY_CHECK_INTERVAL_S, at_start=True)
    watcher.start()
    yield
    await watcher.stop()


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup(app: web.Application) -> None:
    """Routes, and the readiness gauge (create_app calls this after adding its resources)."""
    app.cleanup_ctx.append(readiness_gauge)
    add_routes(
        app,
        ("GET", "/metrics", metrics_endpoint),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
    )
