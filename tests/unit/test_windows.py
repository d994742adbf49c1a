"""Time-window buckets: which bucket a time falls in, what a window reads, when buckets go."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from schemas import windows as w

MINUTE, HOUR, DAY = w.WINDOWS
T0 = 1_774_998_000_000  # a whole hour, in epoch ms
assert T0 % 3_600_000 == 0


def test_resolutions():
    assert [(x.name, x.bucket_ms, x.buckets) for x in w.WINDOWS] == [
        ("minute", 10_000, 6), ("hour", 60_000, 60), ("day", 3_600_000, 24)]


def test_bucket_start():
    assert MINUTE.start(T0) == T0
    assert MINUTE.start(T0 + 9_999) == T0
    assert MINUTE.start(T0 + 10_000) == T0 + 10_000
    assert HOUR.start(T0 + 59_999) == T0
    assert DAY.start(T0 + 3_599_999) == T0


def test_minute_reads_the_current_bucket_and_five_before():
    now = T0 + 65_432
    assert MINUTE.starts(now) == [T0 + 60_000, T0 + 50_000, T0 + 40_000, T0 + 30_000,
                                  T0 + 20_000, T0 + 10_000]


@given(st.integers(min_value=0, max_value=10**13), st.sampled_from(w.WINDOWS))
def test_a_window_covers_between_span_minus_one_bucket_and_span(now, window):
    starts = window.starts(now)
    assert len(starts) == window.buckets
    assert starts[0] <= now < starts[0] + window.bucket_ms
    covered = now - starts[-1]  # history the window holds, up to now
    assert window.span_ms - window.bucket_ms <= covered < window.span_ms


@given(st.integers(min_value=0, max_value=10**13), st.sampled_from(w.WINDOWS))
def test_a_bucket_lives_as_long_as_a_window_reads_it(ms, window):
    start = window.start(ms)
    last_read = start + window.span_ms - 1  # the last moment it is among window.starts(...)
    assert start in window.starts(last_read)
    assert start not in window.starts(last_read + 1)
    assert window.expires_at(start) > last_read


def test_increments_gather_per_bucket_and_skip_zeros():
    inc = w.Increments()
    inc.add("d:sales", T0 + 1_000, {"received": 2, "accepted": 2, "rejected": 0})
    inc.add("d:sales", T0 + 2_000, {"received": 3, "accepted": 1, "rejected": 2})
    inc.add("d:sales", T0 + 11_000, {"received": 1})
    inc.add("s:ing_x", T0 + 1_000, {"written": 0})
    buckets = {key: (expires, dict(counts)) for key, expires, counts in inc}
    assert buckets[f"sluice:win:d:sales:minute:{T0}"] == (
        T0 + 70_000, {"received": 5, "accepted": 3, "rejected": 2})
    assert buckets[f"sluice:win:d:sales:minute:{T0 + 10_000}"] == (T0 + 70_000 + 10_000,
                                                                   {"received": 1})
    assert buckets[f"sluice:win:d:sales:hour:{T0}"][1] == {"received": 6, "accepted": 3,
                                                           "rejected": 2}
    assert buckets[f"sluice:win:d:sales:day:{T0}"] == (T0 + DAY.span_ms + DAY.bucket_ms,
                                                       {"received": 6, "accepted": 3,
                                                        "rejected": 2})
    assert len(buckets) == 4  # two minute buckets, one hour, one day; nothing for all-zero


class Pipe:
    def __init__(self):
        self.commands = []

    def hincrby(self, *args):
        self.commands.append(("hincrby", *args))

    def pexpireat(self, *args):
        self.commands.append(("pexpireat", *args))


def test_queue_adds_every_field_then_sets_the_expiry():
    inc = w.Increments()
    inc.add("d:sales", T0, {"received": 2, "written": 1})
    pipe = Pipe()
    inc.queue(pipe)
    key = f"sluice:win:d:sales:minute:{T0}"
    assert pipe.commands[:3] == [("hincrby", key, "received", 2), ("hincrby", key, "written", 1),
                                 ("pexpireat", key, T0 + 70_000)]
    assert len(pipe.commands) == 9


def test_read_keys_and_summed_agree():
    now = T0 + 3 * 3_600_000 + 125_000
    keys = w.read_keys("s:ing_x", now)
    assert len(keys) == 6 + 60 + 24
    assert keys[0] == f"sluice:win:s:ing_x:minute:{T0 + 3 * 3_600_000 + 120_000}"
    assert keys[6] == f"sluice:win:s:ing_x:hour:{T0 + 3 * 3_600_000 + 120_000}"
    assert keys[66] == f"sluice:win:s:ing_x:day:{T0 + 3 * 3_600_000}"
    hashes = [{} for _ in keys]
    hashes[0] = {b"received": b"4"}
    hashes[5] = {b"received": b"1", b"failed": b"2"}  # the oldest minute bucket
    hashes[6] = {b"received": b"5", b"failed": b"2"}
    hashes[66] = {b"received": b"5", b"failed": b"2"}
    hashes[89] = {b"received": b"7"}  # 23 hours ago
    got = w.summed(hashes, ["received", "failed", "written"])
    assert got == {"minute": {"received": 5, "failed": 2, "written": 0},
                   "hour": {"received": 5, "failed": 2, "written": 0},
                   "day": {"received": 12, "failed": 2, "written": 0}}


def test_writing_and_reading_meet_on_the_same_keys():
    inc = w.Increments()
    written_at = T0 + 5_000
    inc.add("d:sales", written_at, {"accepted": 1})
    written = {key for key, _, _ in inc}
    for later in (written_at, written_at + 50_000):
        assert len(written & set(w.read_keys("d:sales", later))) == 3
    # past the minute: only the hour and the day still count it
    assert len(written & set(w.read_keys("d:sales", T0 + 60_000))) == 2
