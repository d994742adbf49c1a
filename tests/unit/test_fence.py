"""Offset fences and record keys: which records of a batch an append-only table stores."""

from __future__ import annotations

from datetime import UTC, datetime

from workers.rows import Origin, Row, runs, table_rows
from workers.sinks import fence

T0 = datetime(2026, 11, 25, tzinfo=UTC)


def record(offset: int, events: int = 2, *, partition: int = 0, key: str | None = None,
           part: int = 0, rid: str | None = None) -> list[Row]:
    origin = Origin(rid or f"r{offset}", "pos", T0, None, None, key, part, "t", partition,
                    offset)
    return [Row((i,), origin, i) for i in range(events)]


def stored(rows: list[Row], batch) -> list[tuple[int, int, int]]:
    """(partition, offset, index) of the table rows of these records."""
    return [columns[-3:] for columns in table_rows(rows, batch, str)]


def test_a_batch_is_planned_per_record():
    rows = record(4, 3) + record(5, 1) + record(2, 2, partition=1)
    batch = runs(rows)
    assert [(r.origin.offset, r.start, r.end) for r in batch] == [(4, 0, 3), (5, 3, 4), (2, 4, 6)]
    assert stored(rows, batch[1:]) == [(0, 5, 0), (1, 2, 0), (1, 2, 1)]
    assert runs([]) == []


def test_table_rows_convert_each_records_receive_time_once():
    rows = record(4, 3, key="k") + record(5, 2, rid="x")
    converted = []
    got = table_rows(rows, runs(rows), lambda t: converted.append(t) or f"at {t:%Y}")
    assert converted == [T0, T0]  # once per record, not per row
    assert got[0] == (0, "r4", "pos", "at 2026", None, None, "k", 0, "t", 0, 4, 0)
    assert got[4] == (1, "x", "pos", "at 2026", None, None, None, 0, "t", 0, 5, 1)
    assert len(got) == 5


def test_records_below_their_partitions_fence_are_skipped():
    rows = record(4) + record(5) + record(2, partition=1) + record(3, partition=1)
    kept = fence.above(runs(rows), {("t", 0): 5, ("t", 1): 0})
    assert stored(rows, kept) == [
        (0, 5, 0), (0, 5, 1), (1, 2, 0), (1, 2, 1), (1, 3, 0), (1, 3, 1)]


def test_fences_move_past_every_record_seen_skipped_or_not():
    batch = runs(record(9, partition=1) + record(4) + record(5) + record(7, partition=1))
    assert fence.partitions(batch) == [("t", 0), ("t", 1)]
    assert fence.next_fences(batch) == [("t", 0, 6), ("t", 1, 10)]


def test_a_key_seen_twice_in_one_batch_keeps_its_first_record_only():
    first, copy = record(3, key="k", rid="a"), record(8, key="k", rid="b")
    other_part = record(9, key="k", part=1, rid="c")
    unkeyed = record(10, rid="d")
    batch = runs(first + copy + other_part + unkeyed)
    keys = fence.record_keys(batch)
    assert keys == [("pos", "k", 0), ("pos", "k", 1)]
    kept = fence.first_of_fresh_keys(batch, set(keys))
    assert fence.written(kept) == {"a": 2, "c": 2, "d": 2}


def test_a_key_already_recorded_drops_its_records():
    batch = runs(record(3, key="old", rid="a") + record(4, key="new", rid="b"))
    kept = fence.first_of_fresh_keys(batch, {("pos", "new", 0)})
    assert fence.written(kept) == {"b": 2}
