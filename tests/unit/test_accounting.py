"""Worker accounting: rows offered and rows written become per-request, per-connector and
per-session counts (counted per record, not per row)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from schemas import outcomes as o
from workers.accounting import BatchOutcome
from workers.rows import Origin, Row

T0 = datetime(2026, 11, 25, 12, tzinfo=UTC)


def record(rid: str | None, offset: int, events: int, *, connector: str = "pos",
           session: str | None = None) -> list[Row]:
    origin = Origin(rid, connector, T0, session, None, None, 0, "t", 0, offset)
    return [Row((i,), origin, i) for i in range(events)]


def test_written_and_duplicates_per_request_connector_and_session():
    rows = (record("r1", 0, 3, session="s1") + record("r1", 1, 2, session="s1")
            + record("r2", 2, 4) + record(None, 3, 2, connector="kafka"))
    batch = BatchOutcome()
    batch.stored("sales", rows, Counter({"r1": 4, "r2": 4, None: 1}))
    assert batch.requests[("pos", "r1")] == {o.WRITTEN: 4, o.DUPLICATES: 1}
    assert batch.requests[("pos", "r2")] == {o.WRITTEN: 4, o.DUPLICATES: 0}
    assert ("kafka", None) not in batch.requests
    assert batch.stats[("sales", "pos")] == {o.WRITTEN: 8, o.DUPLICATES: 1}
    assert batch.stats[("sales", "kafka")] == {o.WRITTEN: 1, o.DUPLICATES: 1}
    assert batch.sessions["s1"] == {o.WRITTEN: 4, o.DUPLICATES: 1}
    ms = round(T0.timestamp() * 1000)
    assert batch.received_ms == {("pos", "r1"): ms, ("pos", "r2"): ms}
