"""Redis key names of admission and sessions, with the prefix and hash tags every key uses
(schemas.outcomes and schemas.windows build the statistics and request-log keys on them).

Keys of one ingest key on one dataset share a hash tag, so the admission script that touches
the rate bucket and the idempotency record together also runs on Redis Cluster.
"""

from __future__ import annotations

PREFIX = "sluice"


def _tag(dataset: str, key_id: str) -> str:
    return f"{{{dataset}/{key_id}}}"


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first {...}, or the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start:end + 1] if start >= 0 and end > start + 1 else key


def rate_bucket_key(dataset: str, key_id: str) -> str:
    return f"{PREFIX}:rate:{_tag(dataset, key_id)}"


def idempotency_key(dataset: str, key_id: str, token: str) -> str:
    return f"{PREFIX}:idem:{_tag(dataset, key_id)}:{token}"


# Ingestion sessions. Every key of one session shares the hash tag {<session id>}, so the
# scripts that gate a chunk or read a status touch one slot (Redis Cluster).
def session_tag(session_id: str) -> str:
    return f"{{{session_id}}}"


def session_key(session_id: str) -> str:
    """Hash of a session's state: dataset, owner, status, times, gateway-side counts."""
    return f"{PREFIX}:session:{session_tag(session_id)}"


def session_alive_key(session_id: str) -> str:
    """Exists while a pending session is active; its TTL is the inactivity timeout."""
    return f"{PREFIX}:session:{session_tag(session_id)}:alive"


def session_counted_key(session_id: str) -> str:
    """Set of the Idempotency-Keys (with their ingest key's id) of the chunks counted."""
    return f"{PREFIX}:session:{session_tag(session_id)}:counted"


def session_inflight_key(session_id: str) -> str:
    """Sorted set of the chunks being processed, scored by the epoch ms their claim lapses."""
    return f"{PREFIX}:session:{session_tag(session_id)}:inflight"


def sessions_index_key(dataset: str, key_id: str | None = None) -> str:
    """Sorted set of a dataset's session ids (or one ingest key's), scored by creation ms."""
    if key_id is None:
        return f"{PREFIX}:sessions:{dataset}"
    return f"{PREFIX}:sessions:{dataset}:k:{key_id}"
