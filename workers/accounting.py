"""What a batch did, per dataset, connector, request and ingestion session, written to Redis
before the commit: totals, and the time-window buckets of the dataset and the session."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

import orjson
from redis.asyncio import Redis

from schemas import metrics
from schemas import outcomes as o
from schemas import windows as w
from workers.decode import DeadLetter
from workers.rows import Origin, Row


def _ms(origin: Origin) -> int:
    return int(origin.received_at.timestamp() * 1000)


class BatchOutcome:
    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.times: dict[tuple[str, str], list[int]] = {}
        self.requests: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (connector, id)
        self.sessions: dict[str, Counter] = defaultdict(Counter)
        self.errors: dict[tuple[str, str], list[bytes]] = defaultdict(list)

    def received(self, dataset: str, origin: Origin, events: int) -> None:
        """Events read from a record; counted here only when no gateway counted them."""
        if origin.request_id is None:
            key = (dataset, origin.connector)
            self.stats[key][o.RECEIVED] += events
            self.stats[key][o.ACCEPTED] += events
            self._widen(key, _ms(origin))

    def stored(self, dataset: str, rows: list[Row], written: Counter) -> None:
        """``rows`` were offered to storage; ``written`` counts, per request, those that took."""
        offered: Counter = Counter()
        for row in rows:
            offered[(row.origin.connector, row.origin.request_id, row.origin.session_id)] += 1
        left = Counter(written)
        for (connector, rid, session_id), count in offered.items():
            took = min(count, left[rid])
            left[rid] -= took
            self.stats[(dataset, connector)][o.WRITTEN] += took
            self.stats[(dataset, connector)][o.DUPLICATES] += count - took
            metrics.WRITTEN.labels(dataset).inc(took)
            metrics.DUPLICATES.labels(dataset).inc(count - took)
            if rid is not None:
                self.requests[(connector, rid)][o.WRITTEN] += took
                self.requests[(connector, rid)][o.DUPLICATES] += count - took
            if session_id is not None:
                self.sessions[session_id][o.WRITTEN] += took
                self.sessions[session_id][o.DUPLICATES] += count - took

    def failed(self, dataset: str, letter: DeadLetter) -> None:
        origin = letter.origin
        connector = origin.connector if origin else o.KAFKA_CONNECTOR
        self.stats[(dataset, connector)][o.FAILED] += 1
        metrics.DEAD_LETTERED.labels(dataset).inc()
        if origin is not None and origin.session_id is not None:
            self.sessions[origin.session_id][o.FAILED] += 1
        if origin is not None and origin.request_id is not None:
            request = (origin.connector, origin.request_id)
            self.requests[request][o.FAILED] += 1
            self.errors[request].append(orjson.dumps(
                {"index": letter.index, "code": letter.code, "message": letter.error}))

    def _widen(self, key: tuple[str, str], ms: int) -> None:
        span = self.times.get(key)
        if span is None:
            self.times[key] = [ms, ms]
        else:
            span[0], span[1] = min(span[0], ms), max(span[1], ms)

    async def write(self, redis: Redis, script: Any, log_age_s: int) -> None:
        if not (self.stats or self.requests):
            return
        now = int(time.time() * 1000)
        windows = w.Increments()
        pipe = redis.pipeline(transaction=False)
        for (dataset, connector), counts in self.stats.items():
            first, last = self.times.get((dataset, connector), ("", ""))
            await script(keys=[o.stats_key(dataset), o.stats_key(dataset, connector)],
                         args=o.account_args(counts, first, last), client=pipe)
            pipe.sadd(o.connectors_key(dataset), connector)
            windows.add(w.dataset_scope(dataset), now, counts)
        ttl_ms = log_age_s * 1000
        for (connector, rid), counts in self.requests.items():
            _add(pipe, o.request_key(connector, rid), counts, ttl_ms)
        for session_id, counts in self.sessions.items():
            _add(pipe, o.session_stats_key(session_id), counts, ttl_ms)
            windows.add(w.session_scope(session_id), now, counts)
        windows.queue(pipe)
        for (connector, rid), errors in self.errors.items():
            key = o.request_errors_key(connector, rid)
            pipe.rpush(key, *errors[: o.MAX_LOGGED_ERRORS])
            pipe.ltrim(key, 0, o.MAX_LOGGED_ERRORS - 1)
            pipe.pexpire(key, ttl_ms)
        await pipe.execute()


def _add(pipe: Any, key: str, counts: Counter, ttl_ms: int) -> None:
    for name, value in counts.items():
        if value:
            pipe.hincrby(key, name, value)
    pipe.pexpire(key, ttl_ms)
