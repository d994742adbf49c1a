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
from workers.rows import Origin, Row, runs


def _ms(origin: Origin) -> int:
    return round(origin.received_at.timestamp() * 1000)  # the gateway's ms, exactly


class BatchOutcome:
    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.times: dict[tuple[str, str], list[int]] = {}
        self.requests: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (connector, id)
        self.sessions: dict[str, Counter] = defaultdict(Counter)
        self.errors: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        self.received_ms: dict[tuple[str, str], int] = {}  # (connector, id): receive time
        self.letters: list[DeadLetter] = []  # to send to the dead-letter topics

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
        for run in runs(rows):
            origin = run.origin
            key = (origin.connector, origin.request_id, origin.session_id)
            if key not in offered and origin.request_id is not None:
                self.received_ms[(origin.connector, origin.request_id)] = _ms(origin)
            offered[key] += run.end - run.start
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

    def failed(self, dataset: str, letter: DeadLetter, sent: bool = False) -> None:
        """One event dead-lettered: counted, and sent with the batch's letters unless
        ``sent`` already."""
        if not sent:
            self.letters.append(letter)
        origin = letter.origin
        connector = origin.connector if origin else o.KAFKA_CONNECTOR
        self.stats[(dataset, connector)][o.FAILED] += 1
        metrics.DEAD_LETTERED.labels(dataset).inc()
        if origin is not None and origin.session_id is not None:
            self.sessions[origin.session_id][o.FAILED] += 1
        if origin is not None and origin.request_id is not None:
            request = (origin.connector, origin.request_id)
            self.received_ms[request] = _ms(origin)
            self.requests[request][o.FAILED] += 1
            self.errors[request].append(orjson.dumps(
                {"index": letter.index, "code": letter.code, "message": letter.error}))

    def _widen(self, key: tuple[str, str], ms: int) -> None:
        span = self.times.get(key)
        if span is None:
            self.times[key] = [ms, ms]
        else:
            span[0], span[1] = min(span[0], ms), max(span[1], ms)

    async def write(self, redis: Redis, script: Any, requests_script: Any,
                    log_age_s: int) -> None:
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
        for keys, args in self._request_calls().values():
            await requests_script(keys=keys, args=args, client=pipe)
        for session_id, counts in self.sessions.items():
            key = o.session_stats_key(session_id)
            for name, value in counts.items():
                if value:
                    pipe.hincrby(key, name, value)
            pipe.pexpire(key, log_age_s * 1000)
            windows.add(w.session_scope(session_id), now, counts)
        windows.queue(pipe)
        await pipe.execute()

    def _request_calls(self) -> dict[str, tuple[list[str], list[Any]]]:
        """REQUESTS_SCRIPT's keys and arguments, per connector (one hash tag each)."""
        calls: dict[str, tuple[list[str], list[Any]]] = {}
        for request in {**self.requests, **self.errors}:
            connector, rid = request
            call = calls.get(connector)
            if call is None:
                call = calls[connector] = ([o.connector_log_key(connector)],
                                           [o.ORPHAN_TTL_MS, o.MAX_LOGGED_ERRORS,
                                            o.request_key(connector, ""),
                                            o.request_errors_key(connector, "")])
            counts = [x for pair in self.requests.get(request, {}).items() if pair[1]
                      for x in pair]
            errors = self.errors.get(request, [])[: o.MAX_LOGGED_ERRORS]
            call[0].append(o.request_key(connector, rid))
            call[1].extend((self.received_ms.get(request, 0), len(counts) // 2, len(errors),
                            *counts, *errors))
        return calls
