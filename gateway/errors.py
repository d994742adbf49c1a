"""Every error a client can see: one class per failure, with its status and stable code.

Handlers raise these; ``gateway.app``'s middleware renders them once as
``application/problem+json`` (RFC 9457). ``ERROR_CODES`` feeds the README's table.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_TYPE_BASE = "https://sluice.dev/problems/"


class ApiError(Exception):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "INVALID_PAYLOAD"
    title: ClassVar[str] = "The request body is not valid"
    # The answer closes the connection: what is left of the request on it cannot be read.
    closes: ClassVar[bool] = False

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra

    def body(self, request_id: str, instance: str | None) -> dict[str, Any]:
        body = {
            "type": PROBLEM_TYPE_BASE + self.code.lower().replace("_", "-"),
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            "instance": instance,
            "request_id": request_id,
            **self.extra,
        }
        if instance is None:
            del body["instance"]
        return body


class InvalidPayload(ApiError):
    """Top-level shape wrong: not an object, an array of objects, or NDJSON objects."""


class MalformedJson(ApiError):
    code = "MALFORMED_JSON"
    title = "The request body is not well-formed JSON"


class ValidationFailed(ApiError):
    code = "VALIDATION_FAILED"
    title = "One or more items do not match the dataset schema"


class EmptyPayload(ApiError):
    code = "EMPTY_PAYLOAD"
    title = "The request contains no items"


class InvalidHeader(ApiError):
    code = "INVALID_HEADER"
    title = "A request header has a value that cannot be used"


class MalformedRequest(ApiError):
    """The HTTP message itself could not be read (request line, a header, chunked framing);
    answered before any route is chosen, on a connection that is then closed."""

    code = "MALFORMED_REQUEST"
    title = "The HTTP request is malformed"
    closes = True


class InvalidParameter(ApiError):
    code = "INVALID_PARAMETER"
    title = "A query parameter or a field of the request has a value that cannot be used"


class Unauthorized(ApiError):
    status = 401
    code = "UNAUTHORIZED"
    title = "Missing or invalid ingest key"

    def __init__(self, detail: str | None = None):
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="sluice"'})


class Forbidden(ApiError):
    status = 403
    code = "FORBIDDEN"
    title = "This ingest key may not write to this dataset"


class DatasetNotFound(ApiError):
    status = 404
    code = "DATASET_NOT_FOUND"
    title = "No dataset with this id"


class NotFound(ApiError):
    status = 404
    code = "NOT_FOUND"
    title = "No such resource"


class SessionNotFound(ApiError):
    status = 404
    code = "SESSION_NOT_FOUND"
    title = "No ingestion session with this id for this key"


class MethodNotAllowed(ApiError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    title = "This method is not allowed on this resource"


class IdempotencyInFlight(ApiError):
    status = 409
    code = "IDEMPOTENCY_KEY_IN_USE"
    title = "A request with this Idempotency-Key is still being processed"


class SessionClosed(ApiError):
    status = 409
    code = "SESSION_CLOSED"
    title = "The ingestion session is closed and takes no more chunks"


class SessionExpired(ApiError):
    status = 409
    code = "SESSION_EXPIRED"
    title = "The ingestion session expired after its inactivity timeout"


class RequestTimeout(ApiError):
    status = 408
    code = "REQUEST_TIMEOUT"
    title = "The request body did not arrive in time"
    closes = True


class ClientClosedRequest(ApiError):
    """The client went away before its body arrived: no one reads this answer, but the
    request log and the metrics count it as the client's doing (nginx's 499), not ours."""

    status = 499
    code = "CLIENT_CLOSED_REQUEST"
    title = "The client closed the connection before its request body arrived"
    closes = True


class PayloadTooLarge(ApiError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    title = "The request body exceeds the dataset's limit"
    closes = True  # the rest of the body is not drained


class HeaderTooLarge(ApiError):
    status = 431
    code = "HEADER_TOO_LARGE"
    title = "The request line or a header field is longer than the server reads"
    closes = True


class DecompressedTooLarge(ApiError):
    status = 413
    code = "DECOMPRESSED_TOO_LARGE"
    title = "The request body exceeds the limit once decompressed"


class ItemTooLarge(ApiError):
    status = 413
    code = "ITEM_TOO_LARGE"
    title = "One item is larger than the largest Kafka record"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    title = "Content-Type must be application/json or application/x-ndjson"


class UnsupportedEncoding(ApiError):
    status = 415
    code = "UNSUPPORTED_CONTENT_ENCODING"
    title = "Content-Encoding must be gzip or identity"


class SampleUnavailable(ApiError):
    status = 422
    code = "SAMPLE_UNAVAILABLE"
    title = "No sample request can be generated for this dataset's schema"


class IdempotencyMismatch(ApiError):
    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    title = "This Idempotency-Key was used with a different request body"


class RateLimited(ApiError):
    status = 429
    code = "RATE_LIMITED"
    title = "Too many requests for this ingest key"


class BrokerUnavailable(ApiError):
    status = 503
    code = "BROKER_UNAVAILABLE"
    title = "The request could not be made durable in Kafka; retry later"


class TopicNotFound(ApiError):
    status = 503
    code = "TOPIC_NOT_FOUND"
    title = "The dataset's entry topic does not exist in Kafka"


class RedisUnavailable(ApiError):
    status = 503
    code = "REDIS_UNAVAILABLE"
    title = "Idempotency and rate-limit state is unreachable; retry later"


class ServerBusy(ApiError):
    """The process's budget of request bodies in processing (SLUICE_MAX_INFLIGHT_BODY_BYTES)
    had no room for this one within a second: refused before admission, nothing published.
    Often refused while the body is still arriving, whose rest is not drained; and a retry
    on a new connection may reach a less busy gateway."""

    status = 503
    code = "SERVER_BUSY"
    title = "The gateway is processing too many large request bodies; retry later"
    closes = True


class InternalError(ApiError):
    status = 500
    code = "INTERNAL_ERROR"
    title = "Unexpected server error"


def _all_errors() -> list[type[ApiError]]:
    found, todo = [], [ApiError]
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


ERROR_CODES: list[type[ApiError]] = sorted(_all_errors(), key=lambda c: (c.status, c.code))
