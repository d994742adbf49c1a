"""Worker settings from the environment, checked at start-up (``sluice-worker config``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.dataset import Limits
from schemas.envconfig import (
    Variables,
    boolean,
    bootstrap_servers,
    float_min,
    int_range,
    one_of,
    parse_env,
    redis_url,
    table,
)


def storage_url(raw: str) -> str:
    if not raw.startswith(("sqlite:", "postgresql:", "postgres:")):
        raise ValueError("must be sqlite:///path or postgresql://user@host/db")
    return raw


VARIABLES: Variables = {
    "STORAGE_URL": ("storage_url", "sqlite:///var/sluice.db", storage_url,
                    "where rows go: sqlite:///path (embedded) or postgresql://..."),
    "SLUICE_CATALOGUE_DIR": ("catalogue_dir", "schemas/examples", Path,
                             "directory of dataset definition files"),
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka_bootstrap", "127.0.0.1:9092", bootstrap_servers,
                                "Kafka bootstrap servers"),
    "KAFKA_ENABLE_IDEMPOTENCE": ("kafka_idempotence", "true", boolean,
                                 "idempotent dead-letter producer; false for Tansu"),
    "REDIS_URL": ("redis_url", "redis://127.0.0.1:6379/0", redis_url,
                  "Redis for request logs and statistics (redis+sentinel:// for Sentinel)"),
    "WORKER_GROUP_ID": ("group_id", "sluice-workers", str, "Kafka consumer group"),
    "WORKER_PROCESSES": ("processes", "1", int_range(1, 256),
                         "consumer processes (useful up to the number of partitions)"),
    "WORKER_BATCH_SIZE": ("batch_size", "5000", int_range(1, 1_000_000),
                          "records per batch at most"),
    "WORKER_BATCH_MAX_BYTES": ("batch_max_bytes", "1048576", int_range(1024),
                               "record bytes per batch at most (a record larger than that "
                               "still comes alone): bounds memory whatever the records hold"),
    "WORKER_BATCH_MS": ("batch_ms", "200", int_range(1, 60_000),
                        "how long a batch waits to fill before it is written"),
    "WORKER_SESSION_TIMEOUT_MS": ("session_timeout_ms", "10000", int_range(1000, 300_000),
                                  "how long the group waits for a silent worker before its "
                                  "partitions move (Kafka's session.timeout.ms)"),
    "WORKER_METRICS_PORT": ("metrics_port", "9108", int_range(0, 65535),
                            "port of the workers' /metrics (0: none)"),
    "WORKER_CATALOGUE_RELOAD_S": ("reload_s", "10", float_min(0.5),
                                  "how often the catalogue is checked for new datasets"),
    "SLUICE_IDEMPOTENCY_TTL_S": ("idempotency_ttl_s", "86400", int_range(1),
                                 "the gateway's Idempotency-Key retention (set both alike): in an "
                                 "append-only dataset, a record whose key was stored longer "
                                 "before it was received is a new request, stored again"),
    "SLUICE_LOG_MAX_AGE_S": ("log_max_age_s", "604800", int_range(60),
                             "how long ingestion-session statistics are kept"),
    "SLUICE_LOG_LEVEL": ("log_level", "INFO", one_of("DEBUG", "INFO", "WARNING", "ERROR"),
                         "log level"),
    "SLUICE_LOG_FORMAT": ("log_format", "json", one_of("json", "text"),
                          "json: one JSON object per line; text: for a terminal"),
}


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    storage_url: str
    catalogue_dir: Path
    kafka_bootstrap: str
    kafka_idempotence: bool
    redis_url: str
    group_id: str
    processes: int
    batch_size: int
    batch_max_bytes: int
    batch_ms: int
    session_timeout_ms: int
    metrics_port: int
    reload_s: float
    idempotency_ttl_s: int
    log_max_age_s: int
    log_level: str
    log_format: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        values = parse_env(VARIABLES, os.environ if env is None else env)
        values.update(overrides)
        return cls(**values)

    @property
    def limits(self) -> Limits:
        return Limits()


def markdown_table() -> str:
    return table(VARIABLES)
