"""Inbound rate limits (token buckets on the fake clock) and the concurrency cap."""

from __future__ import annotations

import asyncio

from sidecar.clock import FakeClock
from sidecar.config.settings import Bucket, RateLimit
from sidecar.inbound.overload import InFlight, cap_in_flight
from sidecar.inbound.ratelimit import RateLimits, limit_rate
from sidecar.stack import Call, Reply, compose
from tests.support.calls import Next, make_call, ok


def limited(clock: FakeClock, *rules: RateLimit) -> tuple[RateLimits, Next]:
    limits = RateLimits(clock)
    limits.reload(rules)
    return limits, Next()


def call(source: str = "a", method: str = "GET", path: str = "/claims/1") -> Call:
    return make_call(path, method=method, direction="inbound", source=source)


async def statuses(limits: RateLimits, app: Next, *calls: Call) -> list[int]:
    handler = compose(limit_rate(limits=limits), terminal=app)
    return [(await handler(c)).status for c in calls]


async def test_a_caller_over_its_limit_waits_retry_after_and_then_passes(
        clock: FakeClock) -> None:
    limits, app = limited(clock, RateLimit(per_caller=Bucket(rate=1, burst=2)))
    handler = compose(limit_rate(limits=limits), terminal=app)
    assert [(await handler(call())).status for _ in range(2)] == [200, 200]
    refused = await handler(call())
    assert (refused.status, refused.reason) == (429, "rate_limited")
    assert refused.headers["Retry-After"] == "1"
    assert len(app.calls) == 2  # the app never saw it
    clock.advance(float(refused.headers["Retry-After"]))
    assert (await handler(call())).status == 200
    # Another caller has a bucket of its own.
    assert await statuses(limits, app, call("b"), call("b")) == [200, 200]


async def test_the_total_limit_holds_across_callers(clock: FakeClock) -> None:
    limits, app = limited(clock, RateLimit(total=Bucket(rate=10, burst=3)))
    assert await statuses(limits, app, call("a"), call("b"), call("c"), call("d")) == [
        200, 200, 200, 429]
    clock.advance(0.1)  # one token back at 10 a second
    assert await statuses(limits, app, call("d"), call("e")) == [200, 429]


async def test_retry_after_is_whole_seconds_until_a_token_and_at_least_one(
        clock: FakeClock) -> None:
    slow, app = limited(clock, RateLimit(total=Bucket(rate=0.4, burst=1)))
    handler = compose(limit_rate(limits=slow), terminal=app)
    await handler(call())
    assert (await handler(call())).headers["Retry-After"] == "3"  # 2.5 s, rounded up
    fast, app = limited(clock, RateLimit(total=Bucket(rate=100, burst=1)))
    handler = compose(limit_rate(limits=fast), terminal=app)
    await handler(call())
    assert (await handler(call())).headers["Retry-After"] == "1"


async def test_rules_are_scoped_and_every_matching_one_must_admit(clock: FakeClock) -> None:
    limits, app = limited(
        clock,
        RateLimit(total=Bucket(rate=1, burst=3)),
        RateLimit(per_caller=Bucket(rate=1, burst=1), methods=("POST",), paths=("/claims/*",)),
        RateLimit(per_caller=Bucket(rate=1, burst=5), sources=("healthcare-api",)),
    )
    # POSTs to /claims/* get one per caller; a GET is not that rule's business.
    assert await statuses(limits, app, call(method="POST"), call(method="POST"),
                          call(method="GET")) == [200, 429, 200]
    # The refused POST took no token from the total rule: one is left for it.
    assert await statuses(limits, app, call("x", path="/other"), call("y")) == [200, 429]


async def test_refilled_buckets_never_exceed_their_burst(clock: FakeClock) -> None:
    limits, app = limited(clock, RateLimit(per_caller=Bucket(rate=5, burst=2)))
    clock.advance(3600)
    assert await statuses(limits, app, call(), call(), call()) == [200, 200, 429]


async def test_a_reload_keeps_the_buckets_of_rules_that_did_not_change(clock: FakeClock) -> None:
    same = RateLimit(per_caller=Bucket(rate=1, burst=1))
    limits, app = limited(clock, same)
    assert await statuses(limits, app, call()) == [200]
    limits.reload((same,))
    assert await statuses(limits, app, call()) == [429]  # a reload is no free refill
    limits.reload((RateLimit(per_caller=Bucket(rate=1, burst=2)),))
    assert await statuses(limits, app, call(), call(), call()) == [200, 200, 429]


async def test_past_max_in_flight_the_answer_is_503_overloaded_at_once() -> None:
    in_flight = InFlight()
    gate = asyncio.Event()

    async def app(c: Call) -> Reply:
        await gate.wait()
        return ok()

    handler = compose(cap_in_flight(in_flight=in_flight, max_in_flight=2), terminal=app)
    held = [asyncio.ensure_future(handler(call())) for _ in range(2)]
    await asyncio.sleep(0)
    refused = await handler(call())
    assert (refused.status, refused.reason) == (503, "overloaded")
    gate.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert in_flight.count == 0
    assert (await handler(call())).status == 200
