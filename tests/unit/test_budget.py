"""The per-process budget of request-body bytes in processing (gateway.budget)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.budget import BodyBudget, Hold
from gateway.errors import ServerBusy


def partly_held(capacity: int, held: int, wait_s: float = 5) -> tuple[BodyBudget, Hold]:
    """A budget of ``capacity`` bytes, ``held`` of them by another request (its hold)."""
    budget = BodyBudget(capacity, wait_s=wait_s)
    other = budget.hold("sales")
    assert other.try_cover(held)
    return budget, other


def test_taking_with_room_is_immediate_and_giving_returns_it():
    budget = BodyBudget(100)
    assert budget.try_take(60) and budget.try_take(40)
    assert not budget.try_take(1)
    assert budget.in_use == 100
    budget.give(60)
    budget.give(40)
    assert budget.in_use == 0


def test_a_body_larger_than_the_budget_counts_as_all_of_it():
    budget = BodyBudget(100)
    assert budget.counted(500) == 100 and budget.counted(7) == 7
    assert budget.try_take(budget.counted(500))  # admitted alone, never refused forever


async def test_a_waiter_is_admitted_when_room_comes_back():
    budget = BodyBudget(100, wait_s=5)
    assert budget.try_take(80)
    waiting = asyncio.create_task(budget.wait(50, "sales"))
    await asyncio.sleep(0)
    assert budget.waiting == 1 and not waiting.done()
    budget.give(80)
    await waiting
    assert budget.in_use == 50 and budget.waiting == 0


async def test_a_waiter_that_finds_no_room_in_time_is_refused_and_leaves_nothing():
    budget = BodyBudget(100, wait_s=0.05)
    assert budget.try_take(80)
    with pytest.raises(ServerBusy) as refused:
        await budget.wait(50, "sales")
    assert refused.value.status == 503 and refused.value.code == "SERVER_BUSY"
    assert refused.value.headers["Retry-After"] == "1"
    assert budget.in_use == 80 and budget.waiting == 0
    budget.give(80)
    assert budget.in_use == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_a_granted_one_gives_back():
    budget = BodyBudget(100, wait_s=5)
    assert budget.try_take(100)
    cancelled = asyncio.create_task(budget.wait(30, "sales"))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert budget.waiting == 0
    granted = asyncio.create_task(budget.wait(30, "sales"))
    await asyncio.sleep(0)
    budget.give(100)  # grants the waiter (30 in use) ...
    granted.cancel()  # ... which is cancelled before it resumes: the 30 come back
    with pytest.raises(asyncio.CancelledError):
        await granted
    assert budget.in_use == 0 and budget.waiting == 0


async def test_smaller_waiters_behind_a_big_one_are_admitted_when_they_fit():
    budget = BodyBudget(100, wait_s=5)
    assert budget.try_take(90)
    big = asyncio.create_task(budget.wait(90, "sales"))
    small = asyncio.create_task(budget.wait(20, "sales"))
    await asyncio.sleep(0)
    budget.give(70)  # 20 in use: room for the small one, not for the big one
    await small
    assert not big.done() and budget.in_use == 40
    budget.give(20)
    budget.give(20)
    await big
    assert budget.in_use == 90


async def test_a_hold_grows_to_totals_and_gives_back_exactly_what_it_took():
    budget = BodyBudget(100, wait_s=0.05)
    hold = budget.hold("sales")
    assert hold.try_cover(30) and hold.try_cover(20)  # covered already: nothing taken
    assert hold.held == budget.in_use == 30
    assert hold.try_cover(60) and budget.in_use == 60
    assert hold.spare(45) == 15 + 40  # held past what is used, and the free room
    hold.fit(50)
    assert hold.held == budget.in_use == 50
    with hold:  # leaving gives it all back, however it is left
        other = budget.hold("sales")
        with pytest.raises(ServerBusy, match="the 60 bytes this one needed"):
            await other.cover(60)
        assert other.held == 0 and budget.waiting == 0
    assert hold.held == budget.in_use == 0
    hold.release()  # twice is harmless
    assert budget.in_use == 0


async def test_a_hold_past_the_whole_budget_counts_as_all_of_it_and_waits_to_be_alone():
    budget, small = partly_held(100, 10)
    big = budget.hold("sales")
    assert big.try_cover(80)
    growing = asyncio.create_task(big.cover(500))
    await asyncio.sleep(0)
    assert not growing.done() and big.held == 80
    small.release()
    await growing
    assert big.held == budget.in_use == 100
    assert big.spare(500) > 10**9  # alone: inflating more needs no more room
    big.fit(10**6)
    assert big.held == 100
    big.release()
    assert budget.in_use == 0
