"""Bulkheads per target service: one slow service cannot take every connection.

`Bulkhead` holds `max_concurrent` slots and a FIFO line of at most
`max_pending` waiters; `Bulkheads` keeps one per service; `limit` is the layer.
A slot is handed straight from the call that frees it to the first waiter,
so a newcomer can never overtake the line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping

from sidecar.clock import Clock
from sidecar.config.settings import BulkheadPolicy
from sidecar.http import problem
from sidecar.resilience import Registry
from sidecar.resilience.deadline import remaining
from sidecar.stack import Call, Handler, Layer, Reply


class Bulkhead:
    """Slots for calls in flight, and an ordered line for calls waiting for one."""

    def __init__(self, policy: BulkheadPolicy) -> None:
        if policy.max_concurrent < 1 or policy.max_pending < 0:
            raise ValueError("max_concurrent must be at least 1 and max_pending not negative")
        self.policy = policy
        self.in_flight = 0
        self._line: deque[asyncio.Future[None]] = deque()

    @property
    def pending(self) -> int:
        return len(self._line)

    def try_acquire(self) -> bool:
        """Take a free slot if one is free and nobody is waiting for it."""
        if self.in_flight < self.policy.max_concurrent and not self._line:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> bool:
        """Take a slot, waiting in line if there is room in it; False when there is none.

        Cancelling the wait leaves the line; a slot handed over at that very
        moment goes on to the next waiter.
        """
        if self.try_acquire():
            return True
        if self.pending >= self.policy.max_pending:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we were leaving: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # `release` may have dropped it
                    self._line.remove(waiter)
            raise
        return True

    def release(self) -> None:
        """Free a slot: to the first waiter still waiting, else back to the pool."""
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight is unchanged: the slot changes hands
                return
        self.in_flight = max(0, self.in_flight - 1)


class Bulkheads(Registry[BulkheadPolicy, Bulkhead]):
    """A `Bulkhead` per target service."""

    def __init__(
        self, policies: Mapping[str, BulkheadPolicy], *, default: BulkheadPolicy | None = None
    ) -> None:
        super().__init__(policies, default=default or BulkheadPolicy())

    def _build(self, name: str, policy: BulkheadPolicy) -> Bulkhead:
        return Bulkhead(policy)


def limit(*, bulkheads: Bulkheads, clock: Clock) -> Layer:
    """Holds a slot of the target's bulkhead for the whole call, retries included.

    Sits inside the deadline (waiting spends the call's time) and outside
    retry (a retry keeps its slot instead of queueing again). With every slot
    taken the call waits in line within its own deadline; with the line full
    (or `max_pending: 0`) it is refused at once with 503 `bulkhead_full`. A
    wait that outlasts the deadline is 504 `upstream_timeout`. The slot is
    freed when the reply begins: a streamed body does not hold it.
    """

    async def limit_layer(call: Call, next: Handler) -> Reply:
        bulkhead = bulkheads.for_service(call.target)
        if not bulkhead.try_acquire():
            scope = asyncio.timeout(remaining(call, clock))
            try:
                async with scope:
                    admitted = await bulkhead.acquire()
            except TimeoutError:
                if not scope.expired():
                    raise
                return _waited_out(call.target)
            if not admitted:
                return _full(call.target, bulkhead.policy)
        try:
            return await next(call)
        finally:
            bulkhead.release()

    return limit_layer


def _full(service: str, policy: BulkheadPolicy) -> Reply:
    waiting = (
        f"and {policy.max_pending} more waiting" if policy.max_pending else "and waiting is off"
    )
    return problem.reply(
        "bulkhead_full",
        f"{service} already has {policy.max_concurrent} calls in flight {waiting}. "
        f"Retry later, or raise `bulkhead` limits for {service} in the sidecar config.",
    )


def _waited_out(service: str) -> Reply:
    return problem.reply(
        "upstream_timeout",
        f"The call to {service} ran out of time waiting for one of its bulkhead slots. "
        f"Calls to {service} are slow or too many; raise its `timeout` or `bulkhead` limits.",
    )
