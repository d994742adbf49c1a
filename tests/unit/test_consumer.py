"""The worker's batch loop: the collector paused per batch, refusals retried or not."""

from __future__ import annotations

import gc

import pytest

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
    """Only the batch loop: the store refuses the first attempt, then takes the batch."""

    def __init__(self, refusal: Exception):
        self.refusal, self.attempts, self.committed = refusal, 0, []

    async def process(self, batch):
        self.attempts += 1
        if self.attempts == 1:
            raise self.refusal

    async def _commit(self, batch):
        self.committed.append(batch)


async def test_a_batch_the_store_refused_for_now_is_retried_then_committed():
    worker = _FlakyWorker(StorageBusy("DeadlockDetectedError: deadlock detected"))
    await worker._handle(["r1", "r2"])
    assert worker.attempts == 2 and worker.committed == [["r1", "r2"]]


async def test_a_schema_conflict_is_not_retried():
    worker = _FlakyWorker(StorageSchemaError("column units is bigint"))
    with pytest.raises(StorageSchemaError):
        await worker._handle(["r1"])
    assert worker.attempts == 1 and worker.committed == []
