"""Circuit breaking per target service: stop calling a service that keeps failing.

`Breaker` is the state machine (closed, open, half-open and nothing else);
`Breakers` keeps one per service; `guard` is the layer. The breaker holds no
lock and wraps no callable: the layer asks `allow()`, then reports the
attempt's outcome with `record()`, or `release()` when it was cancelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from sidecar.clock import Clock
from sidecar.config.settings import BreakerPolicy
from sidecar.http import problem
from sidecar.http.headers import RETRY_AFTER
from sidecar.resilience import Registry
from sidecar.resilience.classify import Outcome, classify
from sidecar.stack import Call, Handler, Layer, Reply

State = Literal["closed", "open", "half-open"]
OnChange = Callable[[str, State, State], None]  # (service, old, new)


class Breaker:
    """Closed -> open after `failure_threshold` consecutive failures -> half-open
    after `recovery_timeout` -> closed on a probe's success, open on its failure.

    Each state change starts a new `generation`. An outcome reported with an
    older generation (a call admitted before the change) is ignored, so a
    slow call from before the circuit opened can neither close it nor take
    a probe's place.

    Reading `state` or `retry_after()` changes nothing: once `recovery_timeout`
    has passed, an open circuit reads half-open, and the next `allow()` or
    `record()` makes the change (new generation, no probes out, `on_change`).
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        clock: Clock,
        *,
        service: str = "",
        on_change: OnChange | None = None,
    ) -> None:
        if policy.failure_threshold < 1 or policy.half_open_max_calls < 1:
            raise ValueError("failure_threshold and half_open_max_calls must be at least 1")
        self.policy = policy
        self.service = service
        self.generation = 0
        self._clock = clock
        self._on_change = on_change
        self._state: State = "closed"
        self._failures = 0  # consecutive, while closed
        self._probes = 0  # in flight, while half-open
        self._opened_at = 0.0

    @property
    def state(self) -> State:
        if self._state == "open" and self._recovered():
            return "half-open"
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """Whether a call may go now; in half-open, this admits it as one of the probes."""
        self._wake()
        if self._state == "closed":
            return True
        if self._state == "half-open" and self._probes < self.policy.half_open_max_calls:
            self._probes += 1
            return True
        return False

    def record(self, outcome: Outcome, *, generation: int | None = None) -> None:
        """Count an admitted call's outcome; `generation` is the one it was admitted in."""
        self._wake()  # first, so the outcome meets the state that `state` reports
        if generation is not None and generation != self.generation:
            return
        if self._state == "closed":
            self._failures = self._failures + 1 if outcome.failed else 0
            if self._failures >= self.policy.failure_threshold:
                self._open()
        elif self._state == "half-open":
            self._probes = max(0, self._probes - 1)
            if outcome.failed:
                self._open()
            else:
                self._move("closed")
        # While open, an outcome from before the opening changes nothing.

    def release(self, *, generation: int | None = None) -> None:
        """A probe ended without an outcome (cancelled): free its place, count nothing."""
        if generation is not None and generation != self.generation:
            return
        if self._state == "half-open":
            self._probes = max(0, self._probes - 1)

    def retry_after(self) -> int:
        """Whole seconds until the next probe may go; at least 1."""
        if self.state != "open":
            return 1
        wait = self._opened_at + self.policy.recovery_timeout - self._clock.monotonic()
        return max(1, math.ceil(wait))

    def _recovered(self) -> bool:
        return self._clock.monotonic() >= self._opened_at + self.policy.recovery_timeout

    def _wake(self) -> None:
        # The open -> half-open change that `state` already reports, made by an action.
        if self._state == "open" and self._recovered():
            self._move("half-open")

    def _open(self) -> None:
        self._opened_at = self._clock.monotonic()
        self._move("open")

    def _move(self, new: State) -> None:
        old = self._state
        self._state = new
        self.generation += 1
        self._failures = 0
        self._probes = 0
        if self._on_change is not None and old != new:
            self._on_change(self.service, old, new)


class Breakers(Registry[BreakerPolicy, Breaker]):
    """A `Breaker` per target service; `on_change(service, old, new)` for logs and metrics."""

    def __init__(
        self,
        policies: Mapping[str, BreakerPolicy],
        clock: Clock,
        *,
        default: BreakerPolicy | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        super().__init__(policies, default=default or BreakerPolicy())
        self.clock = clock
        self.on_change = on_change

    def _build(self, name: str, policy: BreakerPolicy) -> Breaker:
        return Breaker(policy, self.clock, service=name, on_change=self.on_change)

    def states(self) -> Iterator[tuple[str, State]]:
        """Every configured service with its breaker's state; reading changes none of them."""
        for name, breaker in self.items():
            yield name, breaker.state


def guard(*, breakers: Breakers) -> Layer:
    """Refuses attempts to a service whose circuit is open; records every attempt.

    Sits inside retry, so every attempt counts, and outside the transport.
    Refuses with 503 `circuit_open` and `Retry-After` (whole seconds until
    the next probe). A cancelled attempt is no failure: it only frees its
    probe place. An attempt cut off because the call's deadline passed is a
    timeout, and a timeout is a failure.
    """

    async def guard_layer(call: Call, next: Handler) -> Reply:
        breaker = breakers.for_service(call.target)
        if not breaker.allow():
            return _refuse(call.target, breaker)
        generation = breaker.generation
        try:
            reply = await next(call)
        except Exception as exc:
            breaker.record(classify(exc), generation=generation)
            raise
        except BaseException:
            if _deadline_passed(call, breakers.clock):
                breaker.record(Outcome.FAILURE, generation=generation)
            else:
                breaker.release(generation=generation)
            raise
        breaker.record(classify(reply), generation=generation)
        return reply

    return guard_layer


def _deadline_passed(call: Call, clock: Clock) -> bool:
    # The event loop may fire a timer up to its clock resolution early.
    return call.deadline is not None and clock.monotonic() >= call.deadline - 0.001


def _refuse(service: str, breaker: Breaker) -> Reply:
    wait = breaker.retry_after()
    return problem.reply(
        "circuit_open",
        f"Calls to {service} are paused after {breaker.policy.failure_threshold} consecutive "
        f"failures; the next trial call goes in about {wait} s. Check {service}'s health.",
        headers={RETRY_AFTER: str(wait)},
    )
