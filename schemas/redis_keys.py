"""Redis key names: every key Sluice writes is built here, nowhere else.

Keys of one ingest key on one dataset share a hash tag, so the admission script that touches
the rate bucket and the idempotency record together also runs on Redis Cluster.
"""

from __future__ import annotations

PREFIX = "sluice"


def _tag(dataset: str, key_id: str) -> str:
    return f"{{{dataset}/{key_id}}}"


def rate_bucket_key(dataset: str, key_id: str) -> str:
    return f"{PREFIX}:rate:{_tag(dataset, key_id)}"


def idempotency_key(dataset: str, key_id: str, token: str) -> str:
    return f"{PREFIX}:idem:{_tag(dataset, key_id)}:{token}"
