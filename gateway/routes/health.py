"""GET /healthz (alive), GET /readyz (Redis, Kafka and catalogue usable), GET /metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from gateway.state import STATE
from schemas.metrics_export import exposition


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    timeout = state.settings.redis_timeout_s
    try:
        async with asyncio.timeout(timeout):
            redis_ok = bool(await state.redis.ping())
        redis_detail = "ok"
    except (RedisError, TimeoutError) as exc:
        redis_ok, redis_detail = False, f"unreachable: {type(exc).__name__}"
    topics = [d.entry_topic for d in state.catalogue]
    kafka_ok, kafka_detail = await state.publisher.ready(topics)
    checks = {
        "redis": redis_detail,
        "kafka": kafka_detail,
        "catalogue": f"{len(state.catalogue)} datasets",
    }
    ready = redis_ok and kafka_ok and len(state.catalogue) > 0
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
