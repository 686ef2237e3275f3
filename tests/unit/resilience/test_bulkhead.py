import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from sidecar.clock import FakeClock
from sidecar.config.settings import BulkheadPolicy
from sidecar.resilience.bulkhead import Bulkhead, Bulkheads, limit
from sidecar.stack import Call, Reply
from tests.support.calls import Next, ok
from tests.support.calls import make_call as support_call

T = TypeVar("T")


def make_call(name: str = "") -> Call:
    """A call to `billing`; `name` (its path) tells the gate which call it is."""
    return support_call(f"/{name}", target_name="billing")


class Gate:
    """A fake `next` that holds every call until the test lets it go."""

    def __init__(self) -> None:
        self.entered: list[str] = []
        self.open: dict[str, asyncio.Event] = {}

    async def __call__(self, call: Call) -> Reply:
        name = call.path[1:]
        self.open[name] = asyncio.Event()
        self.entered.append(name)
        await self.open[name].wait()
        return ok()

    def finish(self, name: str) -> None:
        self.open[name].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def start(work: Awaitable[T]) -> "asyncio.Task[T]":
    async def run() -> T:
        return await work

    return asyncio.get_running_loop().create_task(run())


async def test_slots_then_fifo_line_then_full(clock: FakeClock) -> None:
    bulkheads = Bulkheads({"billing": BulkheadPolicy(max_concurrent=2, max_pending=2)})
    layer = limit(bulkheads=bulkheads, clock=clock)
    gate = Gate()
    tasks = {name: start(layer(make_call(name), gate)) for name in "abcd"}
    await settle()
    bulkhead = bulkheads.for_service("billing")
    assert gate.entered == ["a", "b"]
    assert bulkhead.in_flight == 2 and bulkhead.pending == 2

    full = await layer(make_call("e"), gate)
    assert full.status == 503 and full.reason == "bulkhead_full" and full.made_here
    assert gate.entered == ["a", "b"]

    gate.finish("b")
    await settle()
    assert gate.entered == ["a", "b", "c"]  # first in line, first in
    gate.finish("a")
    await settle()
    assert gate.entered == ["a", "b", "c", "d"]
    for name in "cd":
        gate.finish(name)
    replies = [await task for task in tasks.values()]
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert bulkhead.in_flight == 0 and bulkhead.pending == 0


async def test_no_waiting_when_max_pending_is_zero(clock: FakeClock) -> None:
    bulkheads = Bulkheads({"billing": BulkheadPolicy(max_concurrent=1, max_pending=0)})
    layer = limit(bulkheads=bulkheads, clock=clock)
    gate = Gate()
    first = start(layer(make_call("a"), gate))
    await settle()
    refused = await layer(make_call("b"), gate)
    assert refused.reason == "bulkhead_full"
    assert b"waiting is off" in refused.body  # type: ignore[operator]
    gate.finish("a")
    assert (await first).status == 200


async def test_newcomer_cannot_overtake_the_line(clock: FakeClock) -> None:
    bulkhead = Bulkhead(BulkheadPolicy(max_concurrent=1, max_pending=5))
    assert bulkhead.try_acquire()
    waiter = start(bulkhead.acquire())
    await settle()
    bulkhead.release()  # handed to the waiter, not back to the pool
    assert not bulkhead.try_acquire()
    assert await waiter is True
    assert bulkhead.in_flight == 1


async def test_cancelled_waiter_leaves_the_line(clock: FakeClock) -> None:
    bulkhead = Bulkhead(BulkheadPolicy(max_concurrent=1, max_pending=1))
    assert bulkhead.try_acquire()
    waiter = start(bulkhead.acquire())
    await settle()
    assert bulkhead.pending == 1
    waiter.cancel()
    await settle()
    assert bulkhead.pending == 0
    bulkhead.release()
    assert bulkhead.in_flight == 0
    assert bulkhead.try_acquire()


async def test_slot_handed_to_a_leaving_waiter_goes_on(clock: FakeClock) -> None:
    bulkhead = Bulkhead(BulkheadPolicy(max_concurrent=1, max_pending=2))
    assert bulkhead.try_acquire()
    first = start(bulkhead.acquire())
    second = start(bulkhead.acquire())
    await settle()
    bulkhead.release()  # the slot goes to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    await settle()
    assert second.done() and second.result() is True
    assert bulkhead.in_flight == 1 and bulkhead.pending == 0


async def test_slot_freed_when_the_call_fails(clock: FakeClock) -> None:
    bulkheads = Bulkheads({"billing": BulkheadPolicy(max_concurrent=1, max_pending=0)})
    layer = limit(bulkheads=bulkheads, clock=clock)

    with pytest.raises(RuntimeError):
        await layer(make_call(), Next(RuntimeError("boom")))
    assert bulkheads.for_service("billing").in_flight == 0


async def test_wait_ends_at_the_calls_deadline(loop_on: FakeClock) -> None:
    clock = loop_on
    bulkheads = Bulkheads({"billing": BulkheadPolicy(max_concurrent=1, max_pending=1)})
    layer = limit(bulkheads=bulkheads, clock=clock)
    gate = Gate()
    holder = start(layer(make_call("a"), gate))
    await settle()
    waiting = make_call("b")
    waiting.deadline = clock.now + 2
    task = start(layer(waiting, gate))
    await settle()
    assert bulkheads.for_service("billing").pending == 1
    clock.advance(2.5)
    reply = await task
    assert reply.status == 504 and reply.reason == "upstream_timeout"
    assert gate.entered == ["a"]
    assert bulkheads.for_service("billing").pending == 0
    gate.finish("a")
    await holder
    assert bulkheads.for_service("billing").in_flight == 0


def test_invalid_policy_refused() -> None:
    with pytest.raises(ValueError):
        Bulkhead(BulkheadPolicy(max_concurrent=0))
    with pytest.raises(ValueError):
        Bulkhead(BulkheadPolicy(max_pending=-1))
