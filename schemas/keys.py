"""Ingest keys: the key format, creating keys, hashing, and constant-time checks.

A key reads ``sk_<key_id>_<secret>``. The key id is public (it names the connector in logs
and statistics); only the SHA-256 of the whole key is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from schemas.records import KAFKA_CONNECTOR

KEY_PREFIX = "sk_"
KEY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")  # a stored key: its SHA-256, lowercase hex
# Anything shaped like a key in free text: its id (public) and its secret, to be cut.
_KEY_IN_TEXT = re.compile(r"(?<![A-Za-z0-9])(sk_[a-z0-9][a-z0-9-]{0,62}_)[A-Za-z0-9_-]+")
_SECRET_BYTES = 24


@dataclass(frozen=True, slots=True)
class IngestKey:
    """A stored key: its public id and the SHA-256 hex digest of the full key."""

    key_id: str
    sha256: str


def hash_key(key: str) -> str:
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way, and such a key
    # must simply not match (401), not fail to encode (500)
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_id_problem(key_id: object) -> str | None:
    """Why ``key_id`` cannot name an ingest key, or None. ``kafka`` names the records written
    straight to Kafka without a connector header: a key of that name would share their
    request log and statistics."""
    if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
        return f"key id {key_id!r} must match {KEY_ID_RE.pattern}"
    if key_id == KAFKA_CONNECTOR:
        return (f"key id {key_id!r} is reserved for records written straight to Kafka "
                "without a connector header")
    return None


def new_key(key_id: str) -> str:
    """Return a fresh key for ``key_id``; shown once, never stored in plain text."""
    problem = key_id_problem(key_id)
    if problem:
        raise ValueError(problem)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def key_id_of(key: str) -> str | None:
    """The key id embedded in a presented key, or None if it is not shaped like one."""
    if not key.startswith(KEY_PREFIX):
        return None
    # Key ids never contain "_", so the first one ends the id (the secret may hold more).
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not secret or not KEY_ID_RE.match(key_id):
        return None
    return key_id


def redact(text: str) -> str:
    """``text`` with the secret of anything shaped like a key replaced by ``...``: for
    messages that quote a definition file, where a key may have been pasted by mistake in
    place of its hash."""
    return _KEY_IN_TEXT.sub(r"\1...", text)


def matches(presented: str, stored_sha256: str) -> bool:
    """Constant-time comparison of a presented key against a stored digest."""
    return hmac.compare_digest(hash_key(presented), stored_sha256)
