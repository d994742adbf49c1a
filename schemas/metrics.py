"""Every Prometheus metric Sluice exports, with what it measures and its labels.

Labels are bounded: ``dataset`` is a catalogue id (or "unknown"), ``route`` a route template,
``status`` an HTTP status, ``outcome``/``reason`` fixed words, ``topic``/``partition`` the
entry topics' partitions. No request ids, keys or connectors in labels.

Import this only after PROMETHEUS_MULTIPROC_DIR is decided: prometheus-client picks its
multi-process mode when it is first imported (gateway.cli and workers.cli take care of it).
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram, values

# In multi-process mode every increment first asks which process it runs in (a value written
# before a fork must not be shared with the child): os.getpid() is a system call, about a dozen
# per request. The pid is read once here and again in each forked child instead.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


def _process_id() -> int:
    return _pid


os.register_at_fork(after_in_child=_forked)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)

_children: dict[tuple, object] = {}


def child(metric, *labels: str):
    """``metric.labels(*labels)``, remembered: prometheus-client validates the labels and takes
    a lock on every labels() call; the label values are bounded (above), so this is too. For
    the request path; the same child objects labels() returns (fork-safe as they are)."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BYTES = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

# --- gateway -----------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "sluice_http_requests_total", "HTTP requests answered, by dataset, route and status",
    ["dataset", "route", "status"])
HTTP_DURATION = Histogram(
    "sluice_http_request_duration_seconds", "Time from request to answer, by route",
    ["route"], buckets=_LATENCY)
EVENTS = Counter(
    "sluice_events_total", "Events by fate at the gateway: accepted (published) or rejected",
    ["dataset", "outcome"])
REPLAYED = Counter(
    "sluice_idempotent_replays_total", "Requests answered from a stored Idempotency-Key answer",
    ["dataset"])
RATE_LIMITED = Counter(
    "sluice_rate_limited_total", "Requests refused with 429 by the per-key token bucket",
    ["dataset"])
PAYLOAD_BYTES = Histogram(
    "sluice_request_body_bytes", "Request body size as received (before gzip inflation)",
    ["dataset"], buckets=_BYTES)
PUBLISH_DURATION = Histogram(
    "sluice_kafka_publish_duration_seconds", "Time until Kafka acknowledged a request's records",
    buckets=_LATENCY)
PUBLISH_ERRORS = Counter(
    "sluice_kafka_publish_errors_total", "Requests whose records Kafka did not acknowledge",
    ["reason"])
REDIS_ERRORS = Counter(
    "sluice_redis_errors_total", "Redis calls that failed, by operation", ["operation"])
BODY_BUDGET_WAITS = Counter(  # outcome: admitted (room came in time) or refused (503 SERVER_BUSY)
    "sluice_body_budget_waits_total",
    "Waits of request bodies that did not fit the process's SLUICE_MAX_INFLIGHT_BODY_BYTES at "
    "once (one still arriving or inflating may wait more than once), by dataset (empty for "
    "session open and close bodies) and outcome", ["dataset", "outcome"])
GATEWAY_READY = Gauge(
    "sluice_gateway_ready", "1 while Redis, Kafka (every entry topic) and the catalogue pass "
    "/readyz's checks, else 0; the lowest of the live processes", multiprocess_mode="livemin")
CATALOGUE_RELOADS = Counter(  # outcome: loaded (now serving) or failed (the previous one kept)
    "sluice_gateway_catalogue_reloads_total",
    "Catalogue reloads of the gateway's processes (files changed, or SIGHUP), by outcome",
    ["outcome"])
CATALOGUE_RELOAD_FAILED = Gauge(
    "sluice_gateway_catalogue_reload_failed", "1 while the definition files as they are now "
    "failed to load and an older catalogue serves, else 0; the highest of the live processes",
    multiprocess_mode="livemax")
CATALOGUE_LOADED = Gauge(
    "sluice_gateway_catalogue_loaded_timestamp_seconds", "Unix time the catalogue serving "
    "was loaded (at start or by a reload); the oldest of the live processes",
    multiprocess_mode="livemin")

# --- workers -----------------------------------------------------------------------------
WRITTEN = Counter(
    "sluice_worker_records_written_total", "Events that changed a table", ["dataset"])
DUPLICATES = Counter(
    "sluice_worker_duplicates_skipped_total",
    "Events storage skipped: redelivered, retried or older than the stored row", ["dataset"])
DEAD_LETTERED = Counter(
    "sluice_worker_dead_lettered_total", "Events sent to the dead-letter topic", ["dataset"])
BATCH_DURATION = Histogram(
    "sluice_worker_batch_duration_seconds", "Time to process one batch, poll to commit",
    buckets=_LATENCY)
WRITE_DURATION = Histogram(
    "sluice_worker_storage_write_duration_seconds", "Time of one storage transaction",
    ["dataset"], buckets=_LATENCY)
BATCH_RETRIES = Counter(  # reason: the error's type; a step of the worker's start counts too
    "sluice_worker_batch_retries_total",
    "Steps of a batch, or of the worker's start, retried after a transient failure", ["reason"])
CONSUMER_LAG = Gauge(
    "sluice_worker_consumer_lag", "Records in the partition not yet committed by the group",
    ["topic", "partition"], multiprocess_mode="mostrecent")
LAST_COMMIT = Gauge(
    "sluice_worker_last_commit_timestamp_seconds", "Unix time of the last successful commit",
    multiprocess_mode="max")

# --- ingestion sessions ------------------------------------------------------------------
SESSIONS = Counter(
    "sluice_ingestion_sessions_total",
    "Ingestion sessions by event: opened, or closed by their producer (expiry is not an event)",
    ["dataset", "event"])
