"""One timer per call: every time bound of a call on a single event-loop handle.

A call through the sidecar keeps several bounds at once: the call's deadline,
the current attempt's per-try bound, and while the answer's body is relayed,
the idle bound on each read and write. `asyncio.timeout` would make a scope
and a timer handle for each of them, and a new pair for every chunk of the
body; on the fast path those scopes were most of the call's timer cost.

`CallTimer` holds the bounds as plain numbers and one handle, armed at the
nearest. Loosening a bound (an attempt's answer has begun, a chunk moved) only
changes a number: a handle that fires before anything is due re-arms itself
for the nearest bound left. When a bound passes while the call's task waits
where a layer said it may be cut short (`watch`), the task is cancelled, as
`asyncio.timeout` does; the layer that set the bound takes the cancellation
back with `take` and turns it into its own answer (504, a per-try timeout, a
cut body). A bound that passes while nobody watches is only noted: the next
`watch` cancels at once, so the first wait it guards is cut short.
"""

from __future__ import annotations

import asyncio
import math
from typing import Literal

Bound = Literal["call", "attempt", "idle"]
CALL: Bound = "call"  # the call's deadline (resilience.deadline)
ATTEMPT: Bound = "attempt"  # one attempt's wait for its answer to begin (per_attempt)
IDLE: Bound = "idle"  # a relayed body that moved no byte either way (http.edge)


class CallTimer:
    """The bounds of one call, run by the task that made the timer."""

    __slots__ = (
        "_baseline",
        "_cancelled",
        "_ends",
        "_handle",
        "_handle_at",
        "_loop",
        "_passed",
        "_task",
        "_watching",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a call timer belongs to a task"
        self._task = task
        self._ends: dict[Bound, float] = {}  # loop time each bound passes at
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = math.inf
        self._passed: Bound | None = None  # passed and not yet taken back
        self._cancelled = False  # the task was cancelled for `_passed`
        self._baseline = 0  # the task's cancel requests before ours
        self._watching = 0  # > 0 while the task may be cut short

    def set(self, bound: Bound, seconds: float | None) -> None:
        """`bound` passes `seconds` from now; None lifts it."""
        if seconds is None:
            # Lazily: a handle armed for it finds nothing due and re-arms.
            self._ends.pop(bound, None)
            return
        at = self._loop.time() + seconds
        self._ends[bound] = at
        if at < self._handle_at and self._passed is None:
            self._arm(at)

    def watch(self) -> None:
        """From here until `unwatch`, a bound that passes cancels the task."""
        self._watching += 1
        if self._passed is not None and not self._cancelled:
            self._cancel()

    def unwatch(self) -> None:
        self._watching -= 1

    def take(self, *bounds: Bound) -> Bound | None:
        """For a layer holding a `CancelledError`: the bound of `bounds` whose
        passing caused it, taken back (the cancellation is undone); else None.

        None too when the task was also cancelled from elsewhere (the caller
        went away): that cancellation wins and must go on.
        """
        bound = self._passed
        if bound is None or bound not in bounds or not self._cancelled:
            return None
        self._passed, self._cancelled = None, False
        self._rearm()
        return bound if self._task.uncancel() <= self._baseline else None

    def close(self) -> None:
        """The call is over: no bound is kept, and no cancellation is left behind."""
        self._ends.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle, self._handle_at = None, math.inf
        if self._cancelled:
            self._cancelled = False
            self._task.uncancel()
        self._passed = None

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(at, self._fire)
        self._handle_at = at

    def _rearm(self) -> None:
        if self._ends and self._handle is None:
            self._arm(min(self._ends.values()))

    def _fire(self) -> None:
        self._handle, self._handle_at = None, math.inf
        now = self._loop.time()
        due = [(at, bound) for bound, at in self._ends.items() if at <= now]
        if not due:
            self._rearm()
            return
        _, bound = min(due)
        del self._ends[bound]
        # One bound at a time: the next is armed once this one is taken back.
        self._passed = bound
        if self._watching > 0:
            self._cancel()

    def _cancel(self) -> None:
        self._baseline = self._task.cancelling()
        self._cancelled = True
        self._task.cancel()
