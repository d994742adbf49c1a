"""Request bodies for the scenarios: events like the `sales` example, deterministic per seed."""

from __future__ import annotations

import gzip
import random

import orjson

REGIONS = 50_000  # distinct item keys: upserts mostly insert, as a growing stream would


def sales_event(rng: random.Random) -> dict:
    """About 100 bytes of JSON: the fields of the `sales` example dataset."""
    revenue = round(rng.uniform(1_000, 500_000), 2)
    return {
        "region": f"region-{rng.randrange(REGIONS):05d}",
        "revenue": revenue,
        "target": round(revenue * rng.uniform(0.8, 1.2), 2),
        "currency": rng.choice(("EUR", "USD", "GBP", "CHF")),
        "updated_at": f"2026-11-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:"
                      f"{rng.randrange(60):02d}:{rng.randrange(60):02d}Z",
    }


def events(count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [sales_event(rng) for _ in range(count)]


def array_of(count: int, seed: int = 1) -> bytes:
    return orjson.dumps(events(count, seed))


def array_up_to(limit: int, seed: int = 1) -> tuple[bytes, int]:
    """The largest array of events whose encoding fits in ``limit`` bytes, and its length."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    size = 2
    while True:
        item = orjson.dumps(sales_event(rng))
        if size + len(item) + 1 > limit:
            return b"[" + b",".join(parts) + b"]", len(parts)
        parts.append(item)
        size += len(item) + 1


def gzipped(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=6, mtime=0)
