"""Statistics over time windows: bucketed counters in Redis that both sides add to.

Each window (the last minute, hour and day) is a run of fixed buckets: 10 s buckets for the
minute, 1 min buckets for the hour, 1 h buckets for the day. A count goes into the bucket that
holds its time in every window; each bucket key expires on its own once no window can read it,
so nothing sweeps. A window read at time ``now`` is the bucket holding ``now`` and the ones
before it, ``span / bucket`` in all: "the last minute" is the current 10 s bucket and the five
before it (between 50 and 60 seconds of history), likewise for the hour and the day.

Pure functions and key names; the writers queue the increments on their own pipelines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.redis_keys import PREFIX


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    span_ms: int
    bucket_ms: int

    @property
    def buckets(self) -> int:
        return self.span_ms // self.bucket_ms

    def start(self, ms: int) -> int:
        """Start (epoch ms) of the bucket that holds ``ms``."""
        return ms - ms % self.bucket_ms

    def starts(self, now_ms: int) -> list[int]:
        """Starts of the buckets the window covers at ``now_ms``, newest first."""
        current = self.start(now_ms)
        return [current - i * self.bucket_ms for i in range(self.buckets)]

    def expires_at(self, start: int) -> int:
        """When the bucket starting at ``start`` is read by no window any more, plus one
        bucket of slack for clocks that disagree a little between processes."""
        return start + self.span_ms + self.bucket_ms


WINDOWS = (
    Window("minute", 60_000, 10_000),
    Window("hour", 3_600_000, 60_000),
    Window("day", 86_400_000, 3_600_000),
)
_FINEST = WINDOWS[0]
assert all(w.bucket_ms % _FINEST.bucket_ms == 0 and w.span_ms % w.bucket_ms == 0
           for w in WINDOWS)


def dataset_scope(dataset: str) -> str:
    return f"d:{dataset}"


def session_scope(session_id: str) -> str:
    return f"s:{session_id}"


def bucket_key(scope: str, window: Window, start: int) -> str:
    """Hash of the counts of one scope in one bucket (fields as in schemas.outcomes)."""
    return f"{PREFIX}:win:{scope}:{window.name}:{start}"


class Increments:
    """Counts to add, gathered per bucket key, queued on a pipeline in one go.

    ``add`` only sums into the finest bucket (it runs once per request or batch); the coarser
    buckets are derived when the increments are read, since each window's bucket is a whole
    number of the finest ones.
    """

    def __init__(self) -> None:
        self._finest: dict[tuple[str, int], Counter] = {}

    def add(self, scope: str, ms: int, counts: Mapping[str, int]) -> None:
        """Add ``counts`` at time ``ms`` (epoch ms) to the scope's bucket in every window."""
        key = (scope, _FINEST.start(ms))
        entry = self._finest.get(key)
        if entry is None:
            entry = self._finest[key] = Counter()
        entry.update(counts)

    def __iter__(self) -> Iterator[tuple[str, int, Counter]]:
        buckets: dict[str, tuple[int, Counter]] = {}
        for (scope, finest), counts in self._finest.items():
            for window in WINDOWS:
                start = window.start(finest)
                key = bucket_key(scope, window, start)
                entry = buckets.get(key)
                if entry is None:
                    entry = buckets[key] = (window.expires_at(start), Counter())
                entry[1].update(counts)
        for key, (expires_at, counts) in buckets.items():
            nonzero = Counter({name: value for name, value in counts.items() if value})
            if nonzero:
                yield key, expires_at, nonzero

    def queue(self, pipe: Any) -> None:
        """Queue HINCRBY and PEXPIREAT commands on a Redis pipeline (not executed here)."""
        for key, expires_at, counts in self:
            for name, value in counts.items():
                pipe.hincrby(key, name, value)
            pipe.pexpireat(key, expires_at)


def read_keys(scope: str, now_ms: int) -> list[str]:
    """Every bucket key the windows of ``scope`` cover at ``now_ms``, window by window."""
    return [bucket_key(scope, w, start) for w in WINDOWS for start in w.starts(now_ms)]


def summed(hashes: Sequence[Mapping[bytes, bytes]], fields: Sequence[str]) -> dict[str, dict]:
    """Per window, the sum of each field over its buckets; ``hashes`` in ``read_keys`` order."""
    out: dict[str, dict[str, int]] = {}
    position = 0
    for window in WINDOWS:
        total: Counter = Counter()
        for raw in hashes[position: position + window.buckets]:
            for name, value in raw.items():
                total[name.decode() if isinstance(name, bytes) else name] += int(value)
        position += window.buckets
        out[window.name] = {name: total.get(name, 0) for name in fields}
    return out
