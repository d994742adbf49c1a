"""Settings: one typed object built from the environment and checked at start-up.

Every variable is listed in ``VARIABLES`` with its default and meaning; the README's table is
generated from the same list (``sluice config``). A bad value stops the process with the
variable's name and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.catalogue import Catalogue, load_catalogue
from schemas.dataset import Limits
from schemas.envconfig import (
    ConfigError,
    boolean,
    bootstrap_servers,
    float_min,
    int_range,
    one_of,
    parse_env,
    redis_url,
    table,
)
from schemas.keys import SHA256_RE, IngestKey, key_id_problem


def _admin_keys(raw: str) -> tuple[IngestKey, ...]:
    keys = []
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        key_id, sep, digest = entry.partition(":")
        digest = digest.lower()
        if not sep or not SHA256_RE.match(digest):
            raise ValueError("must be a comma-separated list of <key id>:<sha256 hex>")
        problem = key_id_problem(key_id)  # e.g. no presented key could ever carry this id
        if problem:
            raise ValueError(problem)
        keys.append(IngestKey(key_id, digest))
    return tuple(keys)


def _reload_interval(raw: str) -> float:
    value = float(raw)
    if value != 0 and not 0.1 <= value <= 86400:
        raise ValueError("must be 0 (reload on SIGHUP only) or seconds between 0.1 and 86400")
    return value


# name -> (field, default, parser, meaning). Order is the README's order.
VARIABLES: dict[str, tuple[str, str, Callable[[str], Any], str]] = {
    "SLUICE_HOST": ("host", "0.0.0.0", str, "address the gateway listens on"),
    "SLUICE_PORT": ("port", "8080", int_range(1, 65535), "TCP port of the gateway"),
    "SLUICE_PROCESSES": ("processes", "1", int_range(1, 256),
                         "gateway processes sharing the port (SO_REUSEPORT)"),
    "SLUICE_CATALOGUE_DIR": ("catalogue_dir", "schemas/examples", Path,
                             "directory of dataset definition files (*.yaml, *.json)"),
    "SLUICE_CATALOGUE_RELOAD_S": ("catalogue_reload_s", "5", _reload_interval,
                                  "how often each gateway process checks the definition files and reloads them when they changed (also at once on SIGHUP; 0: on SIGHUP only); a catalogue that does not load leaves the last good one serving"),
    "SLUICE_ADMIN_KEYS": ("admin_keys", "", _admin_keys,
                          "admin keys as <key id>:<sha256>, comma-separated (sluice keys create --admin)"),
    "REDIS_URL": ("redis_url", "redis://127.0.0.1:6379/0", redis_url,
                  "Redis for idempotency keys and rate limits (redis+sentinel:// for Sentinel)"),
    "REDIS_TIMEOUT_S": ("redis_timeout_s", "1.0", float_min(0.05),
                        "Redis connect and command timeout; past it requests get 503"),
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka_bootstrap", "127.0.0.1:9092", bootstrap_servers,
                                "Kafka bootstrap servers, host:port[,host:port]"),
    "KAFKA_ENABLE_IDEMPOTENCE": ("kafka_idempotence", "true", boolean,
                                 "idempotent producer; set false for the Tansu broker"),
    "KAFKA_LINGER_MS": ("kafka_linger_ms", "0", int_range(0, 10_000),
                        "producer linger: how long a batch waits for more records (0: records that arrive while a send is in flight go together in the next)"),
    "KAFKA_MAX_BATCH_BYTES": ("kafka_max_batch_bytes", "1048576", int_range(1024),
                              "producer batch size per partition"),
    "KAFKA_MAX_RECORD_BYTES": ("kafka_max_record_bytes", "1000000", int_range(1024),
                               "largest record value; bigger requests are split at item boundaries"),
    "KAFKA_COMPRESSION": ("kafka_compression", "none", one_of("none", "gzip", "snappy", "lz4", "zstd"),
                          "producer compression codec"),
    "KAFKA_PUBLISH_TIMEOUT_S": ("kafka_publish_timeout_s", "10", float_min(0.1),
                                "time for acks=all on every record of a request before 503"),
    "SLUICE_BODY_TIMEOUT_S": ("body_timeout_s", "60", float_min(0.1),
                              "time for a request's whole body to arrive after its headers; past it 408 and the connection is closed"),
    "SLUICE_MAX_REQUEST_BYTES": ("max_request_bytes", "1048576", int_range(1),
                                 "default request body limit (datasets may override)"),
    "SLUICE_MAX_DECOMPRESSED_BYTES": ("max_decompressed_bytes", "8388608", int_range(1),
                                      "default limit on a gzip body once inflated"),
    "SLUICE_MAX_INFLIGHT_BODY_BYTES": ("max_inflight_body_bytes", "16777216", int_range(1),
                                       "per process: request-body bytes held at once, from the first byte received until the answer is built (gzip bodies: compressed and inflated); a body that finds no room within 1 s gets 503 SERVER_BUSY. At least every dataset's max_request_bytes and max_decompressed_bytes; memory sizing in Operations"),
    "SLUICE_RATE_LIMIT_RPS": ("rate_limit_rps", "0", float_min(0),
                              "default requests/s per ingest key and dataset (0: unlimited)"),
    "SLUICE_RATE_LIMIT_BURST": ("rate_limit_burst", "0", int_range(0),
                                "default token-bucket size (0: equal to the rate, at least 1)"),
    "SLUICE_MAX_REPORTED_ERRORS": ("max_reported_errors", "100", int_range(1, 10_000),
                                   "invalid items listed in one error answer"),
    "SLUICE_IDEMPOTENCY_TTL_S": ("idempotency_ttl_s", "86400", int_range(1),
                                 "how long an Idempotency-Key replays its first answer"),
    "SLUICE_IDEMPOTENCY_LOCK_TTL_S": ("idempotency_lock_ttl_s", "60", int_range(1),
                                      "how long an in-flight key blocks duplicates if its process dies"),
    "SLUICE_LOG_MAX_ENTRIES": ("log_max_entries", "10000", int_range(1),
                               "request-log entries kept per connector"),
    "SLUICE_LOG_MAX_AGE_S": ("log_max_age_s", "604800", int_range(60),
                             "age after which request-log entries are dropped; also how long an ingestion session is kept after its last activity"),
    "SLUICE_SESSION_TIMEOUT_S": ("session_timeout_s", "900", int_range(1),
                                 "ingestion session inactivity timeout when the request names none"),
    "SLUICE_SESSION_MIN_TIMEOUT_S": ("session_min_timeout_s", "1", int_range(1),
                                     "shortest inactivity timeout a session may ask for"),
    "SLUICE_SESSION_MAX_TIMEOUT_S": ("session_max_timeout_s", "86400", int_range(1),
                                     "longest inactivity timeout a session may ask for; less than SLUICE_LOG_MAX_AGE_S"),
    "SLUICE_CHUNK_MAX_BYTES": ("chunk_max_bytes", "1048576", int_range(1),
                               "body limit of one session chunk (a dataset's smaller max_request_bytes wins)"),
    "SLUICE_SHUTDOWN_TIMEOUT_S": ("shutdown_timeout_s", "30", float_min(0),
                                  "grace period for in-flight requests on SIGTERM"),
    "SLUICE_LOG_LEVEL": ("log_level", "INFO", one_of("DEBUG", "INFO", "WARNING", "ERROR"),
                         "log level"),
    "SLUICE_LOG_FORMAT": ("log_format", "json", one_of("json", "text"),
                          "json: one JSON object per line, with request_id; text: for a terminal"),
    "SLUICE_ACCESS_LOG": ("access_log", "false", boolean,
                          "one log line per request (method, route, status, duration, request_id)"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    processes: int
    catalogue_dir: Path
    catalogue_reload_s: float
    admin_keys: tuple[IngestKey, ...]
    redis_url: str
    redis_timeout_s: float
    kafka_bootstrap: str
    kafka_idempotence: bool
    kafka_linger_ms: int
    kafka_max_batch_bytes: int
    kafka_max_record_bytes: int
    kafka_compression: str
    kafka_publish_timeout_s: float
    body_timeout_s: float
    max_request_bytes: int
    max_decompressed_bytes: int
    max_inflight_body_bytes: int
    rate_limit_rps: float
    rate_limit_burst: int
    max_reported_errors: int
    idempotency_ttl_s: int
    idempotency_lock_ttl_s: int
    log_max_entries: int
    log_max_age_s: int
    session_timeout_s: int
    session_min_timeout_s: int
    session_max_timeout_s: int
    chunk_max_bytes: int
    shutdown_timeout_s: float
    log_level: str
    log_format: str
    access_log: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse every variable; raise ConfigError naming the first bad one."""
        values = parse_env(VARIABLES, os.environ if env is None else env)
        values.update(overrides)
        settings = cls(**values)
        if settings.idempotency_lock_ttl_s <= settings.kafka_publish_timeout_s:
            raise ConfigError("SLUICE_IDEMPOTENCY_LOCK_TTL_S must exceed KAFKA_PUBLISH_TIMEOUT_S, "
                              "or a slow publish could lose its in-flight lock")
        if not (settings.session_min_timeout_s <= settings.session_timeout_s
                <= settings.session_max_timeout_s):
            raise ConfigError("SLUICE_SESSION_TIMEOUT_S must lie between "
                              "SLUICE_SESSION_MIN_TIMEOUT_S and SLUICE_SESSION_MAX_TIMEOUT_S")
        if settings.session_max_timeout_s >= settings.log_max_age_s:
            # a session's state is kept SLUICE_LOG_MAX_AGE_S after its last activity: with a
            # longer timeout, an idle session still pending would vanish (404) before expiring
            raise ConfigError(
                f"SLUICE_SESSION_MAX_TIMEOUT_S ({settings.session_max_timeout_s}) must be less "
                f"than SLUICE_LOG_MAX_AGE_S ({settings.log_max_age_s}): ingestion sessions are "
                "kept SLUICE_LOG_MAX_AGE_S after their last activity, so a session idle for "
                "longer would be forgotten while still pending")
        return settings

    @property
    def limits(self) -> Limits:
        return Limits(
            max_request_bytes=self.max_request_bytes,
            max_decompressed_bytes=self.max_decompressed_bytes,
            requests_per_second=self.rate_limit_rps,
            burst=self.rate_limit_burst or max(1, int(self.rate_limit_rps)),
        )


def check_body_budget(settings: Settings, catalogue: Catalogue) -> None:
    """The budget of body bytes in processing must admit the largest body a dataset allows,
    or such a body could only ever be admitted alone (the budget counts it as all of itself):
    refused at start-up rather than found out under load. (A gzip body holds its compressed
    and its inflated bytes: one whose two together pass the budget is processed alone.)"""
    largest = max(((max(d.max_request_bytes, d.max_decompressed_bytes), d.id)
                   for d in catalogue), default=None)
    if largest is not None and largest[0] > settings.max_inflight_body_bytes:
        raise ConfigError(
            f"SLUICE_MAX_INFLIGHT_BODY_BYTES ({settings.max_inflight_body_bytes}) must be at "
            f"least the largest body a dataset allows: {largest[0]} bytes (dataset "
            f"{largest[1]!r}'s max_request_bytes or max_decompressed_bytes); raise it, and the "
            "gateway's memory limit with it (README, Operations), or lower the dataset's limit")


def load_checked_catalogue(settings: Settings) -> Catalogue:
    """The catalogue as the gateway serves it, loaded and checked: the same at start-up and
    at every reload (CatalogueError or ConfigError when it cannot serve)."""
    catalogue = load_catalogue(settings.catalogue_dir, settings.limits, settings.admin_keys)
    check_body_budget(settings, catalogue)
    return catalogue


def markdown_table() -> str:
    return table(VARIABLES)
