"""The HTTP layer's own answers: problem+json rendered once, requests aiohttp cannot parse,
and ``Expect``.

aiohttp answers a request it cannot read (a bad request line, a control character in a header,
a header over 8 KiB, broken chunked framing) before any middleware runs: as ``text/plain``
quoting the offending bytes, and logs it at ERROR with a traceback quoting them again. Those
bytes can be an ingest key (``Authorization: Bearer sk_...`` with a stray control character), and
the producer's client gets a body that no problem+json parser reads. aiohttp has no supported
hook for this (aio-libs/aiohttp#3287), so the runner here makes every connection's handler
answer with a stable code, a detail that never quotes the request, one log line without the
bytes, and the request counted in ``sluice_http_requests_total`` under the route ``malformed``.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong

from gateway.budget import Hold
from gateway.errors import (
    ApiError,
    HeaderTooLarge,
    InternalError,
    InvalidHeader,
    MalformedRequest,
)
from gateway.payload import read_limited
from schemas import metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBLEM_JSON = "application/problem+json"
_AWAITS_CONTINUE = web.RequestKey("awaits_continue", bool)  # Expect: 100-continue was sent
MALFORMED_ROUTE = "malformed"  # the route label of requests no route could be chosen for
# Where a parser message starts quoting the request: ": ", or a quote opening a value.
_QUOTED = re.compile(r""":|\s(?:b?['"]|bytearray\()""")


def problem(error: ApiError, rid: str, path: str | None) -> web.Response:
    """The answer for ``error``: RFC 9457 problem+json, rendered here and only here."""
    response = web.Response(status=error.status, body=orjson.dumps(error.body(rid, path)),
                            content_type=PROBLEM_JSON, headers=error.headers)
    if error.closes:
        response.force_close()
    return response


def refusal(status: int, exc: BaseException | None) -> ApiError:
    """The problem for a request aiohttp refused with ``status`` (and the parser's ``exc``)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return HeaderTooLarge(f"the request line or a header field is longer than {limit} "
                              "bytes")
    if status >= 500:  # an error that escaped the application (its middleware maps the rest)
        return InternalError()
    return MalformedRequest(reason(exc))


def reason(exc: BaseException | None) -> str:
    """The parser's reason ("Invalid header value char"), cut before it quotes the request."""
    message = getattr(exc, "message", None)
    first = message.split("\n", 1)[0] if isinstance(message, str) else ""
    said = _QUOTED.split(first, 1)[0].strip()
    return f"{said} (the HTTP message could not be read)" if said else MalformedRequest.title


def header(request: web.Request, name: str) -> str | None:
    """A request header that must be sent at most once: a second copy (which a proxy in front
    might read where this reads the first) is refused, not guessed between."""
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise InvalidHeader(f"{name} was sent {len(values)} times; send it once")
    return values[0] if values else None


async def expect_continue(request: web.Request) -> None:
    """Every route's ``Expect`` handling. ``100-continue`` is noted, and answered only when the
    route reads the body (read_body): a request refused before that (its key, its dataset, its
    headers, its declared length) is refused without the client sending the body, which is
    what the client asked to learn. Any other expectation is ignored, as RFC 9110 allows, so
    the request is answered like one without it (aiohttp's default answers those with a
    text/plain 417 that bypasses the middleware: no problem+json, no request id)."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() == "100-continue":
        request[_AWAITS_CONTINUE] = True


async def read_body(request: web.Request, limit: int, timeout_s: float, hold: Hold) -> bytes:
    """The body (payload.read_limited), held in ``hold`` from its first byte: a declared
    length is held before anything is read, even the ``100 Continue`` a client may wait for
    (a body with no room is refused before it is sent), a chunked body piece by piece."""
    declared = request.content_length
    if declared and not hold.try_cover(declared):
        await hold.cover(declared)
    if request.get(_AWAITS_CONTINUE):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the start of the answer
    return await read_limited(request.content, limit, timeout_s, hold)


def add_routes(app: web.Application, *table: tuple[str, str, Handler]) -> None:
    """Register ``(method, path, handler)`` routes with expect_continue (a GET also answers
    HEAD, as aiohttp's add_get makes it)."""
    for method, path, handler in table:
        add = getattr(app.router, f"add_{method.lower()}")
        add(path, handler, expect_handler=expect_continue)


class EdgeHandler(web.RequestHandler):
    """One connection's protocol, answering unreadable requests as problem+json."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer is out: only closing is left
            raise ConnectionError("an answer was partly sent; the connection is closed")
        error = refusal(status, exc)
        if error.status >= 500:
            log.error("unhandled error while answering a request", exc_info=exc)
        elif self._request_count == 1 and isinstance(exc, BadHttpMethod):
            # Not HTTP at all on a fresh connection (TLS, a port scan): no more than a trace.
            log.debug("refused a non-HTTP connection from %s", request.remote)
        else:
            log.info("refused an unreadable HTTP request from %s: %s %s: %s", request.remote,
                     error.status, error.code, error.detail)
        metrics.child(metrics.HTTP_REQUESTS, "", MALFORMED_ROUTE, str(error.status)).inc()
        rid = "req_" + secrets.token_hex(12)
        response = problem(error, rid, None)  # no instance: the target was not read
        response.headers["X-Request-ID"] = rid
        response.force_close()  # even for a 500: aiohttp closes after any of these
        return response


class EdgeServer(web.Server):
    """Makes each connection's protocol an EdgeHandler."""

    def __call__(self) -> web.RequestHandler:
        return EdgeHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unreadable requests as problem+json.

    The application's server is built by aiohttp as always; only the class of the protocol
    each connection gets is ours (EdgeHandler adds no state)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = EdgeServer
        return server
