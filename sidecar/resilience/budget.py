"""Retry budgets: retries to one service may not outgrow the app's own traffic.

Per target service, retries in the last `window` seconds may not exceed
`min_per_second * window + ratio * requests in that window`, where requests
are the app's calls, not attempts. The floor lets a quiet service still
retry; the ratio stops a failing service from tripling its load.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from sidecar.clock import Clock
from sidecar.config.settings import RetryBudget as BudgetPolicy
from sidecar.resilience import Registry

# A window is kept as this many slots, so memory stays fixed whatever the rate;
# an event is forgotten at most one slot (1% of the window) late.
SLOTS = 100


class SlidingCount:
    """Events in the last `window` seconds, counted in `SLOTS` slots."""

    __slots__ = ("_clock", "_slot", "_slots", "_total", "_window")

    def __init__(self, window: float, clock: Clock) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self._window = window
        self._slot = window / SLOTS
        self._clock = clock
        self._slots: deque[list[int]] = deque()  # [slot number, count], oldest first
        self._total = 0

    def add(self) -> None:
        slot = self._expire()
        if self._slots and self._slots[-1][0] == slot:
            self._slots[-1][1] += 1
        else:
            self._slots.append([slot, 1])
        self._total += 1

    def count(self) -> int:
        self._expire()
        return self._total

    def _expire(self) -> int:
        now = self._clock.monotonic()
        slot = int(now // self._slot)
        # A slot leaves once every moment in it is older than the window.
        oldest_kept = int((now - self._window) // self._slot)
        while self._slots and self._slots[0][0] < oldest_kept:
            self._total -= self._slots.popleft()[1]
        return slot


class RetryBudget:
    """One service's budget: `record_request` per app call, `can_retry`, `record_retry`."""

    __slots__ = ("_requests", "_retries", "policy")

    def __init__(self, policy: BudgetPolicy, clock: Clock) -> None:
        if policy.ratio < 0 or policy.min_per_second < 0:
            raise ValueError("budget ratio and min_per_second must not be negative")
        self.policy = policy
        self._requests = SlidingCount(policy.window, clock)
        self._retries = SlidingCount(policy.window, clock)

    def allowance(self) -> float:
        """Retries the window may hold right now."""
        p = self.policy
        return p.min_per_second * p.window + p.ratio * self._requests.count()

    def record_request(self) -> None:
        self._requests.add()

    def can_retry(self) -> bool:
        return self._retries.count() + 1 <= self.allowance()

    def record_retry(self) -> None:
        self._retries.add()


class RetryBudgets(Registry[BudgetPolicy, RetryBudget]):
    """A `RetryBudget` per target service."""

    def __init__(
        self,
        policies: Mapping[str, BudgetPolicy],
        clock: Clock,
        *,
        default: BudgetPolicy | None = None,
    ) -> None:
        super().__init__(policies, default=default or BudgetPolicy())
        self._clock = clock

    def _build(self, name: str, policy: BudgetPolicy) -> RetryBudget:
        return RetryBudget(policy, self._clock)
