"""The worker's batch loop: the collector paused per batch, refusals retried or not."""

from __future__ import annotations

import gc

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from workers.consumer import Worker, _collector_paused
from workers.sinks import StorageBusy, StorageSchemaError


def test_the_collector_is_paused_for_a_batch_and_back_on_after_it_fails():
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(OSError), _collector_paused():  # a failed batch is retried later
        raise OSError("storage went away")
    assert gc.isenabled()


class _FlakyWorker(Worker):
    """Only the batch loop: the store refuses the first attempt (``refusal``), or Redis
    refuses the first attempt to record the statistics (``redis_refusal``)."""

    def __init__(self, refusal: Exception | None = None,
                 redis_refusal: Exception | None = None):
        self.refusal, self.redis_refusal = refusal, redis_refusal
        self.attempts, self.accounted, self.committed = 0, [], []

    async def process(self, batch):
        self.attempts += 1
        if self.attempts == 1 and self.refusal is not None:
            raise self.refusal
        return f"outcome {self.attempts}"

    async def account(self, outcome):
        if not self.accounted and self.redis_refusal is not None:
            self.accounted.append(None)
            raise self.redis_refusal
        self.accounted.append(outcome)

    async def _commit(self, batch):
        self.committed.append(batch)


async def test_a_batch_the_store_refused_for_now_is_retried_then_committed():
    worker = _FlakyWorker(StorageBusy("DeadlockDetectedError: deadlock detected"))
    await worker._handle(["r1", "r2"])
    assert worker.attempts == 2 and worker.committed == [["r1", "r2"]]
    assert worker.accounted == ["outcome 2"]


async def test_statistics_redis_refused_are_retried_without_storing_again():
    """Storing again would find the rows stored and count them as duplicates, not written."""
    worker = _FlakyWorker(redis_refusal=RedisConnectionError("Connection closed by server"))
    await worker._handle(["r1"])
    assert worker.attempts == 1
    assert worker.accounted == [None, "outcome 1"] and worker.committed == [["r1"]]


async def test_a_schema_conflict_is_not_retried():
    worker = _FlakyWorker(StorageSchemaError("column units is bigint"))
    with pytest.raises(StorageSchemaError):
        await worker._handle(["r1"])
    assert worker.attempts == 1 and worker.committed == [] and worker.accounted == []
