"""Storage sinks: where rows are written. Chosen by STORAGE_URL."""

from __future__ import annotations

from workers.sinks.base import (
    Sink,
    StorageBusy,
    StorageRefused,
    StorageSchemaError,
    WriteResult,
)


def open_sink(url: str, key_window_s: int) -> Sink:
    """``key_window_s``: how long the gateway keeps an Idempotency-Key
    (SLUICE_IDEMPOTENCY_TTL_S; see fence.py)."""
    if url.startswith("sqlite:"):
        from workers.sinks.sqlite import SqliteSink

        return SqliteSink(url, key_window_s)
    if url.startswith(("postgresql:", "postgres:")):
        from workers.sinks.postgres import PostgresSink

        return PostgresSink(url, key_window_s)
    raise ValueError(f"STORAGE_URL {url!r}: use sqlite:///path or postgresql://...")


__all__ = ["Sink", "StorageBusy", "StorageRefused", "StorageSchemaError", "WriteResult",
           "open_sink"]
