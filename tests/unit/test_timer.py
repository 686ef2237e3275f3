"""The call's one timer: bounds on a single handle, cancellations taken back by their layer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.clock import FakeClock
from sidecar.timer import ATTEMPT, CALL, IDLE, CallTimer


class Arms:
    """Counts the timer handles the loop is asked for."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = loop.call_at

        def call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            self.count += 1
            return real(when, callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_at", call_at)


async def settle() -> None:
    """Let the loop run what is due (timers on the fake clock included)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_bounds_that_move_later_arm_no_new_handle(
        loop_on: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    arms = Arms(asyncio.get_running_loop(), monkeypatch)
    timer = CallTimer()
    timer.set(CALL, 10.0)
    timer.set(ATTEMPT, 3.0)  # nearer: the one handle moves there
    for _ in range(100):  # a relayed body moving its idle bound on per chunk
        timer.set(IDLE, 60.0)
        loop_on.advance(0.001)
    timer.set(ATTEMPT, None)
    assert arms.count == 2
    timer.close()


async def test_a_bound_passing_while_watched_cuts_the_wait_and_is_taken_back(
        loop_on: FakeClock) -> None:
    timer = CallTimer()
    timer.set(ATTEMPT, 1.0)
    timer.watch()
    try:
        loop_on.advance(1.5)
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        passed = timer.take(ATTEMPT, CALL)
    finally:
        timer.unwatch()
    assert passed == ATTEMPT
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancellation is undone
    await asyncio.sleep(0)  # and the task goes on
    timer.close()


async def test_a_lifted_bound_never_fires_and_the_next_one_still_does(
        loop_on: FakeClock) -> None:
    timer = CallTimer()
    timer.set(ATTEMPT, 1.0)
    timer.set(CALL, 5.0)
    timer.set(ATTEMPT, None)  # the answer began: lifted, lazily
    timer.watch()
    loop_on.advance(2.0)
    await settle()  # the handle for 1.0 fires, finds nothing due, re-arms for 5.0
    with pytest.raises(asyncio.CancelledError):
        loop_on.advance(4.0)
        await asyncio.Event().wait()
    assert timer.take(ATTEMPT) is None  # not the attempt's: that layer lets it go
    assert timer.take(CALL) == CALL
    timer.unwatch()
    timer.close()


async def test_a_bound_passing_unwatched_is_noted_and_cuts_the_next_watched_wait(
        loop_on: FakeClock) -> None:
    timer = CallTimer()
    timer.set(CALL, 1.0)
    loop_on.advance(2.0)
    await settle()  # passes while nobody watches: no cancellation
    timer.watch()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.Event().wait()
    assert timer.take(CALL) == CALL
    timer.unwatch()
    timer.close()


async def test_a_cancellation_from_elsewhere_wins(loop_on: FakeClock) -> None:
    started = asyncio.Event()
    seen: list[object] = []

    async def call() -> None:
        timer = CallTimer()
        timer.set(CALL, 1.0)
        timer.watch()
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(timer.take(CALL))
            raise
        finally:
            timer.unwatch()
            timer.close()

    task = asyncio.ensure_future(call())
    await started.wait()
    # The caller goes away just after the bound passes, before the task wakes
    # for the timer's cancellation: it wakes with both.
    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + 1.5, task.cancel)
    loop_on.advance(2.0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [None]


async def test_a_cancellation_not_the_timers_is_not_taken(loop_on: FakeClock) -> None:
    timer = CallTimer()
    timer.set(CALL, 1.0)
    loop_on.advance(2.0)
    await settle()  # noted, not cancelled
    assert timer.take(CALL) is None  # a layer holding someone else's CancelledError
    timer.close()


async def test_close_lifts_everything_and_leaves_no_cancellation(loop_on: FakeClock) -> None:
    timer = CallTimer()
    timer.set(CALL, 1.0)
    timer.watch()
    loop_on.advance(2.0)
    with pytest.raises(asyncio.CancelledError):
        await settle()
    timer.close()  # never taken back: closing undoes the cancellation
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    timer.set(IDLE, None)
    loop_on.advance(100.0)
    await settle()
