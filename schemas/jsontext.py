"""Encoding events as JSON text, as deep as they can be parsed.

orjson parses up to 1,024 levels of nesting but encodes only 254; an event between the two
would be accepted and then fail wherever it is encoded again (a split request, the valid
items of a partial one, a session chunk's answer, a json column, a dead letter). Such events
are rare, so the common case stays orjson and the deep one falls back to the standard
library, given the recursion depth it needs.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson

MAX_DEPTH = 1024  # what orjson.loads accepts: every event in Sluice was parsed by it
_ORJSON_DEEP = "Recursion limit reached"


def dumps(value: Any) -> bytes:
    """``orjson.dumps(value)``, also for values nested deeper than orjson encodes."""
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        if str(exc) != _ORJSON_DEEP:
            raise
    return _dumps_deep(value)


def _dumps_deep(value: Any) -> bytes:
    # The C encoder recurses once per level; the limit is restored at once (single-threaded
    # event loops: nothing else runs in between).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 2 * MAX_DEPTH + 200))
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()
    finally:
        sys.setrecursionlimit(limit)
