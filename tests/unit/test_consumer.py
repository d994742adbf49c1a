"""The worker's batch loop: the collector paused per batch; each step retried on its own."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

import orjson
import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas import records as r
from schemas.dataset import Limits, parse_dataset
from schemas.structure import Structure
from workers.consumer import Worker, _Abandoned, _collector_paused
from workers.decode import origin_of
from workers.sinks import StorageBusy, StorageRefused, StorageSchemaError, WriteResult


async def test_the_collector_is_on_while_a_retry_waits_and_paused_again_after():
    states = []

    class Watching(_FlakySink):
        async def write(self, structure, rows):
            states.append(gc.isenabled())
            return await super().write(structure, rows)

    async def watch():  # runs only while the batch loop waits: during the retry's sleep
        while True:
            waiting.append(gc.isenabled())
            await asyncio.sleep(0.01)

    waiting: list[bool] = []
    watcher = asyncio.create_task(watch())
    loop = _BatchLoop(Watching(StorageBusy("08006: connection failure"), "a"))
    await loop._handle(_batch())
    watcher.cancel()
    assert states == [False, False, False] and gc.isenabled()  # a (refused), a, b
    assert len(waiting) > 5 and all(waiting)


def test_the_collector_is_paused_for_a_batch_and_back_on_after_it_fails():
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(OSError), _collector_paused():  # a failed batch is retried later
        raise OSError("storage went away")
    assert gc.isenabled()


class _FlakySink:
    """Takes every write, except that it refuses the first ``refusals`` writes to
    ``refused_table`` with ``refusal``."""

    def __init__(self, refusal: Exception | None = None, refused_table: str = "",
                 refusals: int = 1):
        self.refusal, self.refused_table, self.left = refusal, refused_table, refusals
        self.writes: list[tuple[str, int]] = []  # (table, rows) of each attempt

    async def write(self, structure, rows):
        table = structure.dataset.id
        self.writes.append((table, len(rows)))
        if table == self.refused_table and self.left:
            self.left -= 1
            raise self.refusal
        return WriteResult(Counter(row.origin.request_id for row in rows))


class _Letters:
    def __init__(self, refusal: Exception | None = None):
        self.refusal, self.sent = refusal, []

    async def send(self, letters):
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            raise refusal
        self.sent.append(len(letters))


class _BatchLoop(Worker):
    """The batch loop of a real Worker over two datasets, with the services replaced: the
    sink (_FlakySink), the dead-letter producer (_Letters) and Redis (``account``, which
    refuses once when given ``redis_refusal``); commits are recorded."""

    def __init__(self, sink: _FlakySink, letters: _Letters | None = None,
                 redis_refusal: Exception | None = None):
        self.sink, self.dlq = sink, letters or _Letters()
        self.stopping = asyncio.Event()
        self.structures = {f"ingest.{name}": Structure(parse_dataset(
            {"id": name, "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                    "required": ["n"]}}, Limits())) for name in ("a", "b")}
        self.redis_refusal, self.accounted, self.committed = redis_refusal, [], []

    async def account(self, outcome):
        if self.redis_refusal is not None:
            refusal, self.redis_refusal = self.redis_refusal, None
            raise refusal
        self.accounted.append({dataset: {name: n for name, n in counts.items() if n}
                               for (dataset, _), counts in outcome.stats.items()})

    async def _commit(self, batch):
        self.committed.append(len(batch))


def _batch() -> list[ConsumerRecord]:
    """Two records for each dataset, from request r-a-0, r-a-1, r-b-0, r-b-1, and one
    event that cannot be shaped (``n`` missing) in dataset b."""
    records = []
    for offset, (name, events) in enumerate([("a", [{"n": 1}, {"n": 2}]), ("a", [{"n": 3}]),
                                             ("b", [{"n": 4}]), ("b", [{"x": 5}])]):
        headers = [(r.H_REQUEST_ID, f"r-{name}-{offset % 2}".encode()),
                   (r.H_CONNECTOR, b"pos"), (r.H_RECEIVED_AT, b"1790000000000")]
        records.append(ConsumerRecord(f"ingest.{name}", 0, offset, 0, 0, None,
                                      orjson.dumps(events), None, 0, 0, headers))
    return records


_EXACT = [{"a": {"written": 3}, "b": {"written": 1, "failed": 1}}]


async def test_a_write_the_store_refused_for_now_is_retried_alone():
    """Dataset b's write is refused once: it is retried, a's is not written again."""
    loop = _BatchLoop(_FlakySink(StorageBusy("DeadlockDetectedError: deadlock"), "b"))
    await loop._handle(_batch())
    assert loop.sink.writes == [("a", 3), ("b", 1), ("b", 1)]
    assert loop.accounted == _EXACT and loop.committed == [4]
    assert loop.dlq.sent == [1]


@pytest.mark.parametrize("letters, redis_refusal", [
    (_Letters(KafkaConnectionError("broker away")), None),
    (None, RedisConnectionError("Connection closed by server")),
])
async def test_dead_letters_and_statistics_are_retried_without_writing_again(letters,
                                                                             redis_refusal):
    """Writing again would find the rows stored and count them as duplicates."""
    loop = _BatchLoop(_FlakySink(), letters, redis_refusal)
    await loop._handle(_batch())
    assert loop.sink.writes == [("a", 3), ("b", 1)]
    assert loop.accounted == _EXACT and loop.committed == [4]


async def test_a_schema_conflict_is_not_retried():
    loop = _BatchLoop(_FlakySink(StorageSchemaError("column n is text"), "a"))
    with pytest.raises(StorageSchemaError):
        await loop._handle(_batch())
    assert loop.sink.writes == [("a", 3)] and loop.committed == [] and loop.accounted == []


async def test_a_stop_during_retries_abandons_the_batch_uncommitted():
    loop = _BatchLoop(_FlakySink(StorageBusy("57P03: the database system is starting up"), "b",
                                 refusals=1000))
    handling = asyncio.create_task(loop._handle(_batch()))
    while len(loop.sink.writes) < 3:  # a, then b refused twice: retrying
        await asyncio.sleep(0.05)
    loop.stop()
    with pytest.raises(_Abandoned):
        await asyncio.wait_for(handling, 2)  # woken from its back-off, tried once more
    assert loop.committed == [] and loop.accounted == []


async def test_catalogue_reloads_outlive_a_reload_that_fails_unexpectedly(caplog):
    """The reload loop runs beside the batch loop: if it died, no catalogue change would be
    picked up again, without a sign. A failure of a kind nobody planned for is logged with
    its traceback and the next reload runs."""
    from types import SimpleNamespace

    worker = _BatchLoop(_FlakySink())
    worker.settings = SimpleNamespace(reload_s=0.01)
    worker.consumer = None
    reloads: list[int] = []
    three = asyncio.Event()

    async def load_catalogue() -> bool:
        if len(reloads) < 3:
            reloads.append(len(reloads))
        if len(reloads) == 1:
            raise RuntimeError("unplanned")
        if len(reloads) == 3:
            three.set()
        return False

    worker.load_catalogue = load_catalogue
    periodic = worker._catalogue_reloads()
    periodic.start()
    await asyncio.wait_for(three.wait(), 5)
    await periodic.stop()
    assert len(reloads) == 3
    failed = [r for r in caplog.records if "catalogue reload failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info[0] is RuntimeError


@pytest.mark.parametrize("received, part, expected_ms, expected_part", [
    (b"1790000000000", b"2/3", 1_790_000_000_000, 2),
    (b"99999999999999999999", b"99999999999999999999/1", 1_700_000_000_000, 0),  # too large
    ("\u00b2".encode(), "\u00b2/3".encode(), 1_700_000_000_000, 0),  # isdigit(), not int()
    (b"-5", b"x/2", 1_700_000_000_000, 0),
])
def test_headers_any_client_writes_never_stop_a_worker(received, part, expected_ms,
                                                      expected_part):
    """Beyond the stores' ranges they failed the batch's write for ever; digits int() refuses
    stopped the worker at once. They fall back to the record's time and part 0."""
    record = ConsumerRecord("ingest.a", 0, 7, 1_700_000_000_000, 0, None, b"{}", None, 0, 0,
                            [(r.H_RECEIVED_AT, received), (r.H_PART, part)])
    origin = origin_of(record)
    assert origin.received_at.timestamp() * 1000 == pytest.approx(expected_ms)
    assert origin.part == expected_part


def test_a_header_with_a_null_value_counts_as_absent():
    """Kafka allows a header without a value (None in aiokafka); decoding it stopped the
    worker at that record, every time it was read."""
    record = ConsumerRecord("ingest.a", 0, 7, 1_700_000_000_000, 0, None, b"{}", None, 0, 0,
                            [(r.H_CONNECTOR, b"pos"), (r.H_REQUEST_ID, None),
                             (r.H_RECEIVED_AT, None), ("trace", None)])
    origin = origin_of(record)
    assert (origin.connector, origin.request_id) == ("pos", None)
    assert origin.received_at.timestamp() == 1_700_000_000  # the record's time


async def test_rows_the_store_refuses_are_dead_lettered_before_the_rest_is_written():
    """Once the rest of a batch is written, a redelivery skips its records behind the offset
    fences and would never meet the refused rows again: their letters go out first."""
    steps: list[tuple[str, object]] = []

    class Refusing(_FlakySink):  # refuses the event n = 2 wherever it is
        async def write(self, structure, rows):
            steps.append(("write", [row.values[0] for row in rows]))
            if any(row.values[0] == 2 for row in rows):
                raise StorageRefused("CheckViolationError: n < 2")
            return WriteResult(Counter(row.origin.request_id for row in rows))

        async def refusals(self, structure, rows):
            return ["CheckViolationError: n < 2" if row.values[0] == 2 else None
                    for row in rows]

    class Recorded(_Letters):
        async def send(self, letters):
            steps.append(("letters", [(x.code, x.value) for x in letters]))

    loop = _BatchLoop(Refusing(), Recorded())
    await loop._handle(_batch())
    assert steps == [
        ("write", [1, 2, 3]),
        ("letters", [("STORE_REFUSED", b'{"n":2}')]),  # before the rest is written
        ("write", [1, 3]),
        ("write", [4]),
        ("letters", [("SHAPE_FAILED", b'{"x":5}')]),  # the batch's other letters, after
    ]
    assert loop.accounted == [{"a": {"written": 2, "failed": 1}, "b": {"written": 1,
                                                                       "failed": 1}}]
    assert loop.committed == [4]
