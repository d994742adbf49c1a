"""schemas.periodic: background loops that stop even when a step swallows its cancellation."""

from __future__ import annotations

import asyncio

from schemas.periodic import Periodic


def swallowing_step(calls: list[str]):
    async def step() -> None:
        calls.append("step")
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:  # what redis-py 8 now and then does inside a pipeline
            calls.append("swallowed")
    return step


async def test_a_loop_cancelled_once_inside_such_a_step_runs_on():
    """Why Periodic exists: asyncio.Runner cancels each task once at exit and waits for it."""
    calls: list[str] = []
    step = swallowing_step(calls)

    running = True

    async def loop() -> None:
        while running:
            await step()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done() and "swallowed" in calls
    running = False
    await asyncio.wait_for(task, 1)


async def test_stop_ends_the_loop_even_when_the_step_swallows_cancellation():
    calls: list[str] = []
    periodic = Periodic(swallowing_step(calls), 0.001)
    periodic.start()
    await asyncio.sleep(0.02)
    await asyncio.wait_for(periodic.stop(grace=0.01), 5)  # cancels the step in progress
    assert periodic._task.done()
    assert "swallowed" in calls
    count = len(calls)
    await asyncio.sleep(0.1)
    assert len(calls) == count  # no step after stop


async def test_stop_lets_the_step_in_progress_finish_within_the_grace():
    finished = []

    async def step() -> None:
        await asyncio.sleep(0.05)
        finished.append(True)

    periodic = Periodic(step, 0.001, at_start=True)
    periodic.start()
    await asyncio.sleep(0.01)  # inside the first step, run at start
    await periodic.stop(grace=1)
    assert finished == [True]


async def test_a_step_that_raises_is_logged_and_runs_again(caplog):
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ValueError("broken once")

    periodic = Periodic(step, 0.01, at_start=True)
    periodic.start()
    for _ in range(100):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.01)
    await periodic.stop()
    assert len(calls) >= 3  # the loop outlived the failure
    failures = [r for r in caplog.records if "failed; it runs again" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is ValueError


async def test_woken_it_runs_at_once_and_again_after_a_step_it_was_woken_during():
    """Without an interval it runs only when woken (SIGHUP's catalogue reload); a wake
    during a step runs the step once more after it, and stop ends the wait."""
    calls: list[int] = []
    release = asyncio.Event()

    async def step() -> None:
        calls.append(len(calls))
        await release.wait()

    periodic = Periodic(step, None)
    periodic.start()
    await asyncio.sleep(0.05)
    assert calls == []
    periodic.wake()
    await asyncio.sleep(0.01)
    assert calls == [0]  # running, held
    periodic.wake()
    periodic.wake()
    release.set()
    await asyncio.sleep(0.01)
    assert calls == [0, 1]  # the wakes during the step: one more run
    await asyncio.sleep(0.05)
    assert calls == [0, 1]
    await asyncio.wait_for(periodic.stop(), 1)
    assert periodic._task.done()
