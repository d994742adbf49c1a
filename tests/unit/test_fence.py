"""Offset fences and record keys: which records of a batch an append-only table stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from workers.rows import Origin, Row, runs, table_rows
from workers.sinks import fence

T0 = datetime(2026, 11, 25, tzinfo=UTC)
MS0 = int(T0.timestamp()) * 1000
WINDOW = 86_400_000  # ms


def record(offset: int, events: int = 2, *, partition: int = 0, key: str | None = None,
           part: int = 0, rid: str | None = None, received: datetime = T0) -> list[Row]:
    origin = Origin(rid or f"r{offset}", "pos", received, None, None, key, part, "t",
                    partition, offset)
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


class Store:
    """The store's side of fence.KeyedRecords, as both sinks' statements decide: a key not
    recorded, or recorded more than a window before the probe, is a new request."""

    def __init__(self, window_ms: int, recorded: dict | None = None):
        self.window_ms, self.recorded, self.rounds = window_ms, dict(recorded or {}), 0

    def decide(self, keyed: fence.KeyedRecords) -> None:
        while probes := keyed.probes():
            self.rounds += 1
            new = []
            for c, k, p, ms in probes:
                if (c, k, p) not in self.recorded or ms - self.recorded[c, k, p] > self.window_ms:
                    self.recorded[c, k, p] = ms
                    new.append((c, k, p))
            keyed.recorded(new)


def test_a_key_seen_twice_in_one_batch_keeps_its_first_record_only():
    first, copy = record(3, key="k", rid="a"), record(8, key="k", rid="b")
    other_part = record(9, key="k", part=1, rid="c")
    unkeyed = record(10, rid="d")
    batch = runs(first + copy + other_part + unkeyed)
    keyed = fence.KeyedRecords(batch, WINDOW)
    assert keyed.probes() == [("pos", "k", 0, MS0), ("pos", "k", 1, MS0)]
    store = Store(WINDOW)
    store.decide(keyed)
    assert fence.written(keyed.stored(batch)) == {"a": 2, "c": 2, "d": 2}
    assert store.rounds == 1  # the copy, received with the first, cannot be new: not asked


def test_a_key_already_recorded_drops_its_records():
    batch = runs(record(3, key="old", rid="a") + record(4, key="new", rid="b"))
    keyed = fence.KeyedRecords(batch, WINDOW)
    Store(WINDOW, {("pos", "old", 0): MS0 - WINDOW}).decide(keyed)  # a window before: a copy
    assert fence.written(keyed.stored(batch)) == {"b": 2}


def test_a_key_recorded_more_than_a_window_before_is_a_new_request():
    batch = runs(record(3, key="k", rid="a"))
    keyed = fence.KeyedRecords(batch, WINDOW)
    store = Store(WINDOW, {("pos", "k", 0): MS0 - WINDOW - 1})
    store.decide(keyed)
    assert fence.written(keyed.stored(batch)) == {"a": 2}
    assert store.recorded == {("pos", "k", 0): MS0}  # moved forward


def test_one_key_in_one_batch_a_request_its_copy_and_its_reuse_a_window_later():
    """Records of a key in receive-time order: the first stored, a copy within the window
    skipped, the key reused past that window stored (workers that lag hold them together)."""
    day = timedelta(milliseconds=WINDOW)
    later = record(5, key="k", rid="reuse", received=T0 + day + timedelta(milliseconds=1))
    batch = runs(later + record(3, key="k", rid="first") + record(4, key="k", rid="copy",
                                                                   received=T0 + day))
    keyed = fence.KeyedRecords(batch, WINDOW)
    store = Store(WINDOW)
    store.decide(keyed)
    assert fence.written(keyed.stored(batch)) == {"first": 2, "reuse": 2}
    assert store.recorded == {("pos", "k", 0): MS0 + WINDOW + 1} and store.rounds == 2


def test_a_recorded_key_with_copies_in_the_batch_asks_again_only_for_later_records():
    """The first record is a copy of a request stored before (at R, unknown here): a later
    record may still be more than a window past R, so it is asked; one received at the same
    time may not."""
    batch = runs(record(3, key="k", rid="copy") + record(4, key="k", rid="same")
                 + record(5, key="k", rid="new", received=T0 + timedelta(seconds=2)))
    keyed = fence.KeyedRecords(batch, WINDOW)
    store = Store(WINDOW, {("pos", "k", 0): MS0 - WINDOW + 1000})
    store.decide(keyed)
    assert fence.written(keyed.stored(batch)) == {"new": 2} and store.rounds == 2


def test_receive_times_in_milliseconds_are_exact():
    ms = 1_790_000_000_123
    origin = record(0, received=datetime.fromtimestamp(ms / 1000, UTC))[0].origin
    assert fence.received_ms(origin) == ms
    assert fence.prune_before(ms, WINDOW) == ms - 2 * WINDOW
