"""The aiohttp application: state, middleware that renders every error once, routes."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import reload
from gateway.accounting import Accountant
from gateway.admission import Admitter
from gateway.budget import BodyBudget
from gateway.config import Settings, load_checked_catalogue
from gateway.errors import ApiError, InternalError, MethodNotAllowed, NotFound
from gateway.ingest import Ingestor
from gateway.protocol import problem
from gateway.publisher import Publisher
from gateway.routes import datasets, events, health, ingestions, stats
from gateway.scripts import ScriptBatcher
from gateway.state import REQUEST_ID, STATE, State
from schemas import logs, metrics, redis_client
from schemas.catalogue import catalogue_stamp

log = logging.getLogger(__name__)
access_log = logging.getLogger("sluice.access")
ACCESS_LOG = web.AppKey("access_log", bool)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Passed to AppRunner/TestServer: gzip bodies are inflated by gateway.payload under a limit,
# never by aiohttp's parser (which has none).
SERVER_KWARGS = {"auto_decompress": False, "access_log": None}


def request_id(request: web.Request) -> str:
    given = request.headers.getall("X-Request-ID", ())  # two are unusable too: replaced
    if len(given) == 1 and _REQUEST_ID_RE.match(given[0]):
        return given[0]
    return "req_" + secrets.token_hex(12)


def _from_http(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return NotFound()
    if exc.status == 405:  # with aiohttp's Allow header, which RFC 9110 requires on a 405
        return MethodNotAllowed(headers={"Allow": exc.headers["Allow"]})
    error = ApiError(exc.reason)
    error.status = exc.status  # type: ignore[misc]
    return error


def _labels(request: web.Request) -> tuple[str, str]:
    """Bounded labels: the route template, and the dataset only if the catalogue knows it."""
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    dataset = request.match_info.get("dataset")
    if dataset is not None and request.app[STATE].catalogue.get(dataset) is None:
        dataset = "unknown"
    return template, dataset or ""


@web.middleware
async def edge(request: web.Request, handler) -> web.StreamResponse:
    """Around every request: its id (on the answer and on every log line), every error
    rendered once as problem+json, metrics, and the optional access log. One middleware, not
    several: each level is resumed again at every await of the handler."""
    started = time.perf_counter()
    rid = request[REQUEST_ID] = request_id(request)
    token = logs.REQUEST_ID.set(rid)
    try:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = problem(exc, rid, request.path)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = problem(_from_http(exc), rid, request.path)
        except Exception:
            log.exception("unhandled error")
            response = problem(InternalError(), rid, request.path)
        response.headers["X-Request-ID"] = rid
        route, dataset = _labels(request)
        elapsed = time.perf_counter() - started
        metrics.child(metrics.HTTP_DURATION, route).observe(elapsed)
        metrics.child(metrics.HTTP_REQUESTS, dataset, route, str(response.status)).inc()
        if request.app[ACCESS_LOG]:
            access_log.info("%s %s %d", request.method, route, response.status, extra={
                "method": request.method, "route": route, "dataset": dataset or None,
                "status": response.status, "duration_ms": round(elapsed * 1000, 3),
                "body_bytes": request.content_length})
        return response
    finally:
        logs.REQUEST_ID.reset(token)


def create_app(settings: Settings) -> web.Application:
    """Build the application; the catalogue is loaded (and checked) here, and again by
    gateway.reload whenever its files change."""
    try:
        stamp = catalogue_stamp(settings.catalogue_dir)  # before reading them: reload.reload
    except OSError:
        stamp = ()  # no directory: loading it says so
    catalogue = load_checked_catalogue(settings)
    # client_max_size bounds only aiohttp's own body readers (request.read(), post()), which
    # no route calls: each reads its body with its dataset's limit (payload.read_limited) from
    # the catalogue serving the request, so a limit a reload raises applies at once
    app = web.Application(middlewares=[edge],
                          client_max_size=catalogue.max_request_bytes)
    app[ACCESS_LOG] = settings.access_log

    async def resources(app: web.Application) -> AsyncIterator[None]:
        redis = redis_client.connect(settings.redis_url, settings.redis_timeout_s)
        publisher = Publisher(settings)
        await publisher.start()
        scripts = ScriptBatcher(redis)
        admitter = Admitter(scripts, settings.idempotency_lock_ttl_s, settings.idempotency_ttl_s)
        ingestor = Ingestor(admitter, publisher, settings.max_reported_errors,
                            BodyBudget(settings.max_inflight_body_bytes))
        accountant = Accountant(redis, log_max_entries=settings.log_max_entries,
                                log_max_age_s=settings.log_max_age_s)
        accountant.start()
        app[STATE] = State(settings, catalogue, redis, publisher, ingestor, accountant,
                           start_topics=frozenset(d.entry_topic for d in catalogue))
        yield
        await accountant.stop()
        await publisher.stop()
        await admitter.close()
        await scripts.close()
        await redis.aclose()

    app.cleanup_ctx.append(resources)
    reload.setup(app, settings, stamp)  # after resources: it needs the State
    events.setup(app)
    datasets.setup(app)
    health.setup(app)
    stats.setup(app)
    ingestions.setup(app)
    return app
