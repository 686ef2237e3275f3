import asyncio

import pytest

from sidecar.clock import FakeClock
from sidecar.config.settings import BreakerPolicy
from sidecar.resilience.breaker import Breaker, Breakers, OnChange, guard
from sidecar.resilience.classify import Outcome
from sidecar.stack import Call, Reply, UpstreamError
from tests.support.calls import Next, make_call, ok

POLICY = BreakerPolicy(failure_threshold=3, recovery_timeout=30, half_open_max_calls=2)


def opened(
    clock: FakeClock, policy: BreakerPolicy = POLICY, *, on_change: OnChange | None = None
) -> Breaker:
    breaker = Breaker(policy, clock, service="billing", on_change=on_change)
    for _ in range(policy.failure_threshold):
        assert breaker.allow()
        breaker.record(Outcome.FAILURE)
    assert breaker.state == "open"
    return breaker


def test_consecutive_failures_open_it(clock: FakeClock) -> None:
    breaker = Breaker(POLICY, clock)
    breaker.record(Outcome.FAILURE)
    breaker.record(Outcome.RETRYABLE)
    breaker.record(Outcome.SUCCESS)  # resets the count
    breaker.record(Outcome.FAILURE)
    breaker.record(Outcome.FAILURE)
    assert breaker.state == "closed"
    breaker.record(Outcome.FAILURE)
    assert breaker.state == "open"
    assert not breaker.allow()


def test_half_open_after_recovery_timeout(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.advance(29.9)
    assert breaker.state == "open" and not breaker.allow()
    clock.advance(0.1)
    assert breaker.state == "half-open"


def test_exactly_n_probes(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.advance(30)
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()


def test_probe_success_closes(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.advance(30)
    assert breaker.allow()
    breaker.record(Outcome.SUCCESS)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0


def test_probe_failure_reopens_for_a_full_recovery_timeout(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.advance(30)
    assert breaker.allow()
    clock.advance(5)
    breaker.record(Outcome.FAILURE)
    assert breaker.state == "open"
    assert breaker.retry_after() == 30
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()


def test_cancelled_probe_frees_its_place_and_counts_nothing(clock: FakeClock) -> None:
    breaker = opened(
        clock, BreakerPolicy(failure_threshold=1, recovery_timeout=10, half_open_max_calls=1)
    )
    clock.advance(10)
    assert breaker.allow()
    generation = breaker.generation
    assert not breaker.allow()
    breaker.release(generation=generation)
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow()


def test_late_outcomes_from_before_a_change_are_ignored(clock: FakeClock) -> None:
    breaker = Breaker(
        BreakerPolicy(failure_threshold=1, recovery_timeout=10, half_open_max_calls=1), clock
    )
    assert breaker.allow()
    slow = breaker.generation  # admitted while closed, answers much later
    breaker.record(Outcome.FAILURE)
    clock.advance(10)
    assert breaker.allow()  # the one probe
    breaker.record(Outcome.SUCCESS, generation=slow)
    assert breaker.state == "half-open"  # the slow call cannot close it
    breaker.release(generation=slow)
    assert not breaker.allow()  # nor free the probe's place


def test_retry_after_is_whole_seconds_at_least_one(clock: FakeClock) -> None:
    breaker = opened(clock)
    assert breaker.retry_after() == 30
    clock.advance(10.5)
    assert breaker.retry_after() == 20
    clock.advance(19.4)
    assert breaker.retry_after() == 1


def test_on_change_reports_every_transition(clock: FakeClock) -> None:
    seen: list[tuple[str, str, str]] = []
    breakers = Breakers({"billing": POLICY}, clock, on_change=lambda *c: seen.append(c))
    breaker = breakers.for_service("billing")
    for _ in range(3):
        breaker.record(Outcome.FAILURE)
    clock.advance(30)
    assert breaker.allow()
    breaker.record(Outcome.SUCCESS)
    assert seen == [
        ("billing", "closed", "open"),
        ("billing", "open", "half-open"),
        ("billing", "half-open", "closed"),
    ]


def test_reading_the_state_changes_nothing(clock: FakeClock) -> None:
    seen: list[tuple[str, str, str]] = []
    breaker = opened(clock, on_change=lambda *c: seen.append(c))
    generation = breaker.generation
    seen.clear()
    clock.advance(29.5)
    assert breaker.state == "open" and breaker.retry_after() == 1
    clock.advance(0.5)
    for _ in range(3):
        assert breaker.state == "half-open" and breaker.retry_after() == 1
    assert seen == []
    assert breaker.generation == generation
    assert breaker.allow()  # an action: this makes the change the reads reported
    assert seen == [("billing", "open", "half-open")]
    assert breaker.generation == generation + 1
    assert breaker.allow()
    assert not breaker.allow()  # still exactly half_open_max_calls probes


def test_record_makes_the_change_before_counting(clock: FakeClock) -> None:
    seen: list[tuple[str, str, str]] = []
    breaker = Breaker(POLICY, clock, service="billing", on_change=lambda *c: seen.append(c))
    assert breaker.allow()
    slow = breaker.generation  # admitted while closed
    for _ in range(3):
        breaker.record(Outcome.FAILURE)
    clock.advance(30)
    assert breaker.state == "half-open" and len(seen) == 1
    breaker.record(Outcome.SUCCESS, generation=slow)
    assert seen[-1] == ("billing", "open", "half-open")  # the change is made ...
    assert breaker.state == "half-open"  # ... and the late outcome ignored
    assert breaker.allow() and breaker.allow() and not breaker.allow()


def test_invalid_policy_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        Breaker(BreakerPolicy(half_open_max_calls=0), clock)


def test_registry_reload_keeps_unchanged_state(clock: FakeClock) -> None:
    breakers = Breakers({"billing": POLICY, "claims": POLICY}, clock)
    for name in ("billing", "claims"):
        for _ in range(3):
            breakers.for_service(name).record(Outcome.FAILURE)
    breakers.reload({"billing": POLICY, "claims": BreakerPolicy()})
    assert breakers.for_service("billing").state == "open"
    assert breakers.for_service("claims").state == "closed"
    assert dict((n, b.state) for n, b in breakers.items()) == {
        "billing": "open",
        "claims": "closed",
    }


# --- the layer ------------------------------------------------------------------------------


async def test_guard_counts_every_attempt_and_refuses_when_open(clock: FakeClock) -> None:
    breakers = Breakers({"billing": POLICY}, clock)
    layer = guard(breakers=breakers)
    failing = Next(ok(503))

    for _ in range(3):
        assert (await layer(make_call(target_name="billing"), failing)).status == 503
    refused = await layer(make_call(target_name="billing"), failing)
    assert len(failing.calls) == 3
    assert refused.status == 503 and refused.reason == "circuit_open" and refused.made_here
    assert refused.headers["Retry-After"] == "30"
    assert refused.headers["x-sidecar-reason"] == "circuit_open"


async def test_guard_counts_exceptions_and_reraises(clock: FakeClock) -> None:
    breakers = Breakers({"billing": POLICY}, clock)
    layer = guard(breakers=breakers)
    refused = Next(UpstreamError("connect-failure", sent=False))

    for _ in range(3):
        with pytest.raises(UpstreamError):
            await layer(make_call(target_name="billing"), refused)
    assert breakers.for_service("billing").state == "open"


async def test_guard_4xx_is_success(clock: FakeClock) -> None:
    breakers = Breakers({"billing": POLICY}, clock)
    layer = guard(breakers=breakers)
    not_found = Next(ok(404))

    for _ in range(5):
        await layer(make_call(target_name="billing"), not_found)
    assert breakers.for_service("billing").state == "closed"


async def test_guard_cancelled_probe_is_not_a_failure(clock: FakeClock) -> None:
    policy = BreakerPolicy(failure_threshold=1, recovery_timeout=5, half_open_max_calls=1)
    breakers = Breakers({"billing": policy}, clock)
    breakers.for_service("billing").record(Outcome.FAILURE)
    clock.advance(5)
    layer = guard(breakers=breakers)
    started = asyncio.Event()

    async def hang(call: Call) -> Reply:
        started.set()
        await asyncio.Event().wait()
        return ok()

    async def probe() -> Reply:
        return await layer(make_call(target_name="billing"), hang)

    task = asyncio.get_running_loop().create_task(probe())
    await started.wait()
    # The probe is out:
    assert (await layer(make_call(target_name="billing"), hang)).reason == "circuit_open"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    breaker = breakers.for_service("billing")
    assert breaker.state == "half-open"
    assert breaker.allow()  # its place is free again


async def test_guard_deadline_cut_is_a_failure(clock: FakeClock) -> None:
    policy = BreakerPolicy(failure_threshold=1, recovery_timeout=5, half_open_max_calls=1)
    breakers = Breakers({"billing": policy}, clock)
    layer = guard(breakers=breakers)

    async def timed_out(call: Call) -> Reply:
        clock.advance(3)  # the outer deadline fires and cancels the attempt
        raise asyncio.CancelledError

    call = make_call(target_name="billing")
    call.deadline = clock.now + 2
    with pytest.raises(asyncio.CancelledError):
        await layer(call, timed_out)
    assert breakers.for_service("billing").state == "open"
