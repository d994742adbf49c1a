"""One worker process: poll a batch, decode and shape, write, dead-letter, account, commit.

Offsets are committed only after the batch's rows are written, its dead letters acknowledged
and its outcomes recorded, so a crash anywhere before the commit redelivers the batch, and
storage's natural keys make the redelivery a no-op (at-least-once delivery, exactly-once
effect). A failing step is retried with backoff on the same batch; SIGTERM lets the current
batch finish, commits it and leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from redis.exceptions import RedisError

from schemas import metrics, redis_client
from schemas import outcomes as o
from schemas import records as r
from schemas.catalogue import CatalogueError, Stamp, catalogue_stamp, load_catalogue
from schemas.periodic import Periodic
from schemas.structure import Structure
from workers import unreadable
from workers.accounting import BatchOutcome
from workers.config import WorkerSettings
from workers.decode import DeadLetter, Decoded, decode, letter
from workers.dlq import DeadLetters
from workers.rows import reduce_latest
from workers.sinks import (
    Sink,
    StorageBusy,
    StorageRefused,
    StorageSchemaError,
    WriteResult,
    open_sink,
)

log = logging.getLogger(__name__)
_MAX_BACKOFF_S = 10.0
_PRUNE_S = 3600.0  # how often the Idempotency-Keys of append-only tables are pruned, at most


class Worker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.sink: Sink = open_sink(settings.storage_url, settings.idempotency_ttl_s)
        self.dlq = DeadLetters(settings.kafka_bootstrap, settings.kafka_idempotence)
        self.redis = redis_client.connect(settings.redis_url, 2)
        self.account_script = self.redis.register_script(o.ACCOUNT_SCRIPT)
        self.account_requests = self.redis.register_script(o.REQUESTS_SCRIPT)
        self.structures: dict[str, Structure] = {}  # by entry topic
        self.consumer: AIOKafkaConsumer | None = None
        self.stopping = asyncio.Event()
        self._catalogue_stamp: Stamp = ()
        self.batches = 0
        self._lag_shown: set[TopicPartition] = set()  # partitions whose lag this process sets
        self._partition_bytes = min(settings.batch_max_bytes, 1024 * 1024)  # of one fetch

    # -- catalogue ---------------------------------------------------------------------------

    async def load_catalogue(self) -> bool:
        """(Re)load the catalogue and prepare tables; True when the topic set changed."""
        stamp = catalogue_stamp(self.settings.catalogue_dir)
        if stamp == self._catalogue_stamp:
            return False
        catalogue = load_catalogue(self.settings.catalogue_dir, self.settings.limits)
        structures = {d.entry_topic: Structure(d) for d in catalogue}
        for structure in structures.values():
            await self.sink.prepare(structure)
        changed = set(structures) != set(self.structures)
        # a new dict, never the old one changed: a batch in flight keeps the one it took
        self.structures = structures
        self._catalogue_stamp = stamp
        return changed

    def _catalogue_reloads(self) -> Periodic:
        return Periodic(self._reload_catalogue, self.settings.reload_s, name="catalogue reload")

    async def _reload_catalogue(self) -> None:
        """One reload (every WORKER_CATALOGUE_RELOAD_S: _catalogue_reloads, whose Periodic logs
        anything unplanned and goes on): a changed topic set is subscribed to."""
        try:
            if await self.load_catalogue() and self.consumer is not None:
                log.info("catalogue changed: consuming %s", sorted(self.structures))
                self.consumer.subscribe(topics=sorted(self.structures))
        except (CatalogueError, OSError, StorageBusy, StorageSchemaError) as exc:
            # tried again at the next reload; a column type conflict (StorageSchemaError)
            # stops a worker only at start, where it cannot run with an older catalogue
            log.error("catalogue reload failed, keeping the previous one: %s", exc)

    # -- bookkeeping -------------------------------------------------------------------------

    def _key_prunings(self) -> Periodic:
        return Periodic(self._prune_keys, min(_PRUNE_S, self.settings.idempotency_ttl_s),
                        at_start=True, name="idempotency key pruning")

    async def _prune_keys(self) -> None:
        """Delete the Idempotency-Keys of append-only tables that decide nothing any more
        (fence.prune_before), so their bookkeeping stays bounded; in transactions of their
        own, beside the batches."""
        try:
            deleted = await self.sink.prune(time.time_ns() // 1_000_000)
        except (OSError, StorageBusy) as exc:  # storage away: next time
            log.warning("pruning idempotency keys failed (%s: %s); trying again later",
                        type(exc).__name__, exc)
            return
        if deleted:
            log.info("pruned %d idempotency keys past their window", deleted)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        reloads = self._catalogue_reloads()
        prunings = self._key_prunings()
        try:
            await self._start()
            reloads.start()
            prunings.start()
            log.info("worker consuming %s into %s", sorted(self.structures),
                     self.settings.storage_url.split("@")[-1])
            while not self.stopping.is_set():
                batch = await self._poll()
                self._forget_lost_lag()
                if batch:
                    await self._handle(batch)
        except _Abandoned as exc:
            if exc.batch:
                log.warning("stopping with a batch of %d records not committed (%s): the "
                            "group delivers it again", len(exc.batch), exc.reason)
            else:
                log.warning("stopping before the worker had started (%s)", exc.reason)
        finally:
            await reloads.stop()
            await prunings.stop()
            if self.consumer is not None:
                await self.consumer.stop()  # leaves the group
            await self.dlq.stop()
            await self.sink.close()
            await self.redis.aclose()

    async def _start(self) -> None:
        """Storage, catalogue, dead-letter producer and consumer, each step retried while its
        service is away: a worker may start before them, or during a failover."""
        await self._retried([], self.sink.start)
        await self._retried([], self.load_catalogue)
        await self._retried([], self.dlq.start)
        self.consumer = AIOKafkaConsumer(
            *sorted(self.structures),
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.group_id,
            client_id="sluice-worker",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.batch_size,
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=min(3000, self.settings.session_timeout_ms // 3),
            # one fetch brings at most about a batch's bytes (a larger record still comes)
            fetch_max_bytes=self.settings.batch_max_bytes,
            max_partition_fetch_bytes=self._partition_bytes,
        )
        await self._retried([], self.consumer.start)

    def stop(self) -> None:
        self.stopping.set()

    async def _poll(self) -> list:
        """A batch: records of several fetches, each record once.

        aiokafka starts a new assignment at every rebalance, and a partition the worker keeps
        is fetched again from its committed offset: after a rebalance between two fetches, the
        second gives records the batch already holds (an append-only table, whose offset
        fences compare with the stored fence only, would store them twice). A partition's
        fetch is in offset order, so one comparison per partition and fetch finds them."""
        assert self.consumer is not None
        batch: list = []
        size = 0  # bytes of record values: a batch's memory is several times that, decoded
        last: dict[TopicPartition, int] = {}  # the offset of each partition's last record
        deadline = time.monotonic() + self.settings.batch_ms / 1000
        while (len(batch) < self.settings.batch_size and size < self.settings.batch_max_bytes
               and not self.stopping.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=int(remaining * 1000),
                    max_records=self.settings.batch_size - len(batch))
            except unreadable.ERRORS as exc:
                # a record the client cannot read (a header key that is not UTF-8): the
                # batch ends with it, dead-lettered, and its partition moves past it alone
                batch.extend(await self._retried(
                    batch, unreadable.skip, self.consumer, self.settings.kafka_bootstrap,
                    last, self._partition_bytes, exc))
                break
            for tp, records in fetched.items():
                if tp in last and records[0].offset <= last[tp]:  # fetched again
                    records = [rec for rec in records if rec.offset > last[tp]]
                    if not records:
                        continue
                last[tp] = records[-1].offset
                batch.extend(records)
                size += sum(len(rec.value) for rec in records if rec.value is not None)
        return batch

    async def _handle(self, batch: list) -> None:
        """Store the batch (each dataset's rows in one transaction), dead-letter what could
        not be shaped, record the statistics, then commit the offsets. Each of these steps is
        retried on its own while its service is away: retrying one that had succeeded would
        find its rows stored and count them as duplicates instead of written."""
        started = time.perf_counter()
        with _collector_paused():
            outcome = await self.process(batch)
        await self._retried(batch, self.dlq.send, outcome.letters)
        await self._retried(batch, self.account, outcome)
        await self._commit(batch)
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)

    async def _retried(self, batch: list, step: Callable[..., Awaitable[Any]],
                       *args: Any) -> Any:
        """``step(*args)``, a step of ``batch`` (empty: of the worker's start), again after each
        transient failure, until it succeeds or the worker is told to stop (then the batch is
        abandoned uncommitted: _Abandoned)."""
        delay = 0.2
        while True:
            try:
                return await step(*args)
            except StorageSchemaError:
                raise  # needs a person: stop with the message
            except (OSError, KafkaError, RedisError, TimeoutError, StorageBusy) as exc:
                # transient (storage, broker or Redis away): the same step again, idempotently
                reason = f"{type(exc).__name__}: {exc}"
                if self.stopping.is_set():
                    raise _Abandoned(batch, reason) from exc
                metrics.BATCH_RETRIES.labels(type(exc).__name__).inc()
                log.warning("%s failed (%s); retrying in %.1f s",
                            f"batch of {len(batch)} records" if batch else "start", reason,
                            delay)
                # an outage may last: no garbage piles up meanwhile; stop() wakes it early
                with _collector_on(), contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)

    async def _commit(self, batch: list) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for record in batch:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        assigned = self.consumer.assignment()
        offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # A rebalance took the partitions: their new owner redelivers, storage dedupes.
            log.warning("commit after a rebalance failed: %s", exc)
            return
        self.batches += 1
        metrics.LAST_COMMIT.set(time.time())
        for tp, committed in offsets.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - committed))
                self._lag_shown.add(tp)

    def _forget_lost_lag(self) -> None:
        """A partition a rebalance took reads 0 here: its new owner shows its lag. (Left
        as it was, the last value stayed for good and summed into the alerts' lag.) Set to
        0, not removed: the multiprocess collector would still read the value from this
        process's file, and keeps the most recent one of the processes."""
        if not self._lag_shown:
            return
        assert self.consumer is not None
        lost = self._lag_shown - self.consumer.assignment()
        for tp in lost:
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(0)
        self._lag_shown -= lost

    # -- the steps ---------------------------------------------------------------------------

    async def process(self, batch: list) -> BatchOutcome:
        """Decode, shape and write one batch, each dataset's write retried on its own; what
        it did (and the dead letters to send) for the steps after it."""
        outcome = BatchOutcome()
        # one catalogue for the whole batch: a reload while it is written (the writes await)
        # applies from the next batch, and the sinks write each row with the structure that
        # shaped it (Sink.write)
        structures = self.structures
        per_dataset: dict[str, Decoded] = defaultdict(Decoded)
        records, skipped = unreadable.split(batch)
        for record in skipped:
            self._dead_letter_unreadable(record, structures, outcome)
        for record in records:
            structure = structures.get(record.topic)
            if structure is None:
                continue  # a dataset removed from the catalogue: leave its topic alone
            origin, events = decode(record, structure, per_dataset[record.topic])
            outcome.received(structure.dataset.id, origin, events)
        for topic, decoded in per_dataset.items():
            structure = structures[topic]
            rows = decoded.rows
            while True:
                latest, superseded = reduce_latest(structure, rows)
                if not latest:
                    break
                try:
                    result = await self._retried(batch, self._write, structure, latest)
                except StorageRefused as exc:
                    # the same rows would be refused again, for ever: the ones refused alone
                    # are dead-lettered and the rest written (older writes of their item keys
                    # included, which the refused rows no longer supersede). The letters go
                    # out first: once the rest is written, a redelivery skips the refused
                    # rows' records and would not find them again.
                    refused = await self._refused(batch, structure, latest, exc)
                    await self._retried(batch, self.dlq.send, list(refused.values()))
                    for letter in refused.values():
                        outcome.failed(structure.dataset.id, letter, sent=True)
                    rows = [row for row in rows if id(row) not in refused]
                    continue
                # superseded rows lost only to a newer write in the same batch: they count
                # as written, as they would have been one statement at a time
                written = result.written.copy()
                for row in superseded:
                    written[row.origin.request_id] += 1
                outcome.stored(structure.dataset.id, latest + superseded, written)
                break
            for letter in decoded.dead:
                outcome.failed(structure.dataset.id, letter)
        return outcome

    @staticmethod
    def _dead_letter_unreadable(record: unreadable.Unreadable,
                                structures: dict[str, Structure],
                                outcome: BatchOutcome) -> None:
        """A record the client could not read: one event received and dead-lettered
        (MALFORMED_HEADER), as a record that is not JSON is."""
        structure = structures.get(record.topic)
        if structure is None:
            return  # a dataset removed from the catalogue: its records are left alone
        dead = unreadable.letter(record)
        outcome.received(structure.dataset.id, dead.origin, 1)
        outcome.failed(structure.dataset.id, dead)

    async def _refused(self, batch: list, structure: Structure, rows: list,
                       exc: StorageRefused) -> dict[int, DeadLetter]:
        """Dead letters (STORE_REFUSED) of the rows the store refuses on their own, by the
        row's id; StorageRefused again when it refuses none alone (then only together, which
        needs a person: the worker stops)."""
        why = await self._retried(batch, self.sink.refusals, structure, rows)
        records = {(rec.topic, rec.partition, rec.offset): rec for rec in batch}
        events: dict[tuple, list] = {}  # of the records holding refused rows, decoded once
        letters = {}
        for row, reason in zip(rows, why, strict=True):
            if reason is not None:
                origin = row.origin
                where = (origin.topic, origin.partition, origin.offset)
                record = records[where]
                if where not in events:
                    events[where] = r.decode_value(record.value)
                event = events[where][row.index]
                letters[id(row)] = letter(record, event, "STORE_REFUSED",
                                          f"the store refused the event: {reason}", row.index,
                                          origin)
        if not letters:
            raise exc
        log.warning("the store refused %d of %d rows of dataset %s (%s); they go to the "
                    "dead-letter topic", len(letters), len(rows), structure.dataset.id, exc)
        return letters

    async def _write(self, structure: Structure, rows: list) -> WriteResult:
        started = time.perf_counter()
        result = await self.sink.write(structure, rows)
        metrics.WRITE_DURATION.labels(structure.dataset.id).observe(
            time.perf_counter() - started)
        return result

    async def account(self, outcome: BatchOutcome) -> None:
        """Record a stored batch's statistics and request-log counts in Redis."""
        await outcome.write(self.redis, self.account_script, self.account_requests,
                            self.settings.log_max_age_s)


class _Abandoned(Exception):
    """The worker was told to stop while a step of ``batch`` kept failing: nothing of it is
    committed, so the group delivers it again (storage keeps it exactly once). An empty
    batch: a step of the worker's start."""

    def __init__(self, batch: list, reason: str):
        super().__init__(reason)
        self.batch, self.reason = batch, reason


@contextlib.contextmanager
def _collector_on():
    """The collector on for a while (a retry's wait), then as it was."""
    was_on = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was_on:
            gc.disable()


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection while a batch is handled; it resumes after the batch.

    A batch allocates a few hundred thousand tuples and rows that hold no cycles and die with
    the batch; with the collector on, its generational passes ran hundreds of times per batch
    and kept rescanning the live rows (about 0.7 us of 5 per event). Cycles made meanwhile
    (by the Kafka or Redis clients) wait at most one batch; retries sleep with it on.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def run_worker(settings: WorkerSettings) -> None:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()

