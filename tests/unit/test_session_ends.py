"""Deferred chunk ends: tried until Redis takes them, in turn, bounded, one last try at stop."""

from __future__ import annotations

import logging

from redis.exceptions import TimeoutError

from gateway.session_ends import DeferredEnds


class Redis:
    """Stands in for the end script: fails while ``away``, records what it ran."""

    def __init__(self) -> None:
        self.away = True
        self.ran: list[str] = []
        self.calls = 0

    async def run(self, keys: list[str], args: list) -> None:
        self.calls += 1
        if self.away:
            raise TimeoutError("Timeout reading from socket")
        self.ran.append(args[0])


async def test_ends_wait_while_redis_is_away_and_run_once_it_is_back():
    redis = Redis()
    ends = DeferredEnds(redis.run)
    for claim in ("a", "b", "c"):
        ends.add("ing_1", ["k"], [claim])
    await ends.retry()
    assert redis.calls == 1 and len(ends) == 3  # one failure ends the pass
    await ends.retry()
    assert redis.calls == 2  # the next end's turn: a failing one does not block the others
    redis.away = False
    await ends.retry()
    assert sorted(redis.ran) == ["a", "b", "c"] and len(ends) == 0


async def test_an_end_is_given_up_after_its_time_and_beyond_the_bound(caplog):
    redis = Redis()
    ends = DeferredEnds(redis.run, give_up_after_s=0.0, max_pending=2)
    with caplog.at_level(logging.ERROR, "gateway.session_ends"):
        ends.add("ing_1", ["k"], ["a"])
        ends.add("ing_2", ["k"], ["b"])
        ends.add("ing_3", ["k"], ["c"])  # the oldest, a, is given up
        assert len(ends) == 2
        await ends.retry()  # b fails past its time: given up
    assert len(ends) == 1
    assert [r.getMessage().split("session ")[1].split(" ")[0] for r in caplog.records] == [
        "ing_1", "ing_2"]


async def test_stop_gives_what_is_left_one_last_try():
    redis = Redis()
    ends = DeferredEnds(redis.run, interval=60)
    ends.start()
    ends.add("ing_1", ["k"], ["a"])
    redis.away = False
    await ends.stop()
    assert redis.ran == ["a"] and len(ends) == 0

