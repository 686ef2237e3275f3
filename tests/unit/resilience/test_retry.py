import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from multidict import CIMultiDict

from sidecar.clock import FakeClock
from sidecar.config.settings import Backoff, RetryBudget, RetryPolicy
from sidecar.http import problem
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.classify import Outcome, classify
from sidecar.resilience.retry import backoff_delay, retry, retry_after
from sidecar.stack import Body, Call, Reply, UpstreamError
from tests.support.calls import Next, target
from tests.support.calls import make_call as support_call

GENEROUS = RetryBudget(ratio=1.0, min_per_second=100, window=10)


class Released:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class Tracked(Reply):
    """A reply that remembers how often its connection was released."""

    counter: Released


def answer(status: int, **headers: str) -> Reply:
    reply = Tracked(status=status, headers=CIMultiDict(headers))
    reply.counter = Released()
    reply.release = reply.counter
    return reply


def released(reply: Reply) -> int:
    assert isinstance(reply, Tracked)
    return reply.counter.count


def make_call(method: str = "GET", body: Body | None = None, /, **headers: str) -> Call:
    return support_call("/claims", method=method, body=body, headers=headers, to=target("billing"))


def routed(call: Call, policy: RetryPolicy | None) -> Call:
    """Route `call` to a target whose retry settings are `policy`."""
    call.upstream = target(call.target, retry=policy or RetryPolicy())
    return call


async def run(
    clock: FakeClock,
    call: Call,
    script: Next,
    policy: RetryPolicy | None = None,
    budgets: RetryBudgets | None = None,
) -> Reply:
    retry_layer = retry(
        budgets=budgets or RetryBudgets({"billing": GENEROUS}, clock),
        clock=clock,
        rng=random.Random(7),
    )
    if call.deadline is None:
        call.deadline = clock.now + 10
    return await retry_layer(routed(call, policy), script)


# --- delays ---------------------------------------------------------------------------------


def test_full_jitter_ranges() -> None:
    rng = random.Random(3)
    backoff = Backoff(base=0.025, max=1.0)
    for n, ceiling in [(0, 0.025), (1, 0.05), (2, 0.1), (5, 0.8), (6, 1.0), (30, 1.0), (500, 1.0)]:
        samples = [backoff_delay(backoff, n, rng) for _ in range(2000)]
        assert all(0 <= s < ceiling for s in samples)
        assert max(samples) > ceiling * 0.9  # the whole range is used, not a fixed step
        assert min(samples) < ceiling * 0.1


def test_retry_after_seconds_and_date() -> None:
    now = 1_700_000_000.0
    assert retry_after(answer(503, **{"Retry-After": "3"}), now) == 3.0
    date = format_datetime(datetime.fromtimestamp(now + 5, UTC), usegmt=True)
    assert retry_after(answer(503, **{"Retry-After": date}), now) == pytest.approx(5.0)
    past = format_datetime(datetime.fromtimestamp(now - 50, UTC), usegmt=True)
    assert retry_after(answer(503, **{"Retry-After": past}), now) == 0.0
    assert retry_after(answer(503, **{"Retry-After": "soon"}), now) is None
    assert retry_after(answer(503, **{"Retry-After": "-1"}), now) is None
    assert retry_after(answer(503), now) is None


@pytest.mark.parametrize("digits", [16, 400, 5000])
def test_a_retry_after_of_absurd_length_is_infinite_not_an_error(digits: int) -> None:
    # int() refuses 5000 digits and float() overflows at 309: neither may escape.
    assert retry_after(answer(503, **{"Retry-After": "9" * digits}), 0.0) == float("inf")
    assert retry_after(answer(503, **{"Retry-After": "9" * 15}), 0.0) == 999_999_999_999_999


async def test_an_endless_retry_after_forbids_the_retry(clock: FakeClock) -> None:
    first = answer(503, **{"Retry-After": "1" + "0" * 400})
    script = Next(first, answer(200))
    call = make_call()
    call.deadline = None  # not even "no deadline" makes an endless wait worth it
    reply = await run(clock, call, script)
    assert reply is first
    assert len(script.calls) == 1 and clock.sleeps == []


# --- what is retried ------------------------------------------------------------------------


async def test_get_retried_until_success(clock: FakeClock) -> None:
    first, second, third = answer(503), answer(502), answer(200)
    script = Next(first, second, third)
    call = make_call()
    reply = await run(clock, call, script)
    assert reply is third
    assert len(script.calls) == 3 and call.attempts == 3
    assert call.retries == 2
    assert released(first) == 1 and released(second) == 1 and released(third) == 0
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] < 0.025 and 0 <= clock.sleeps[1] < 0.05


async def test_attempts_include_the_first(clock: FakeClock) -> None:
    script = Next(*[answer(503) for _ in range(5)])
    call = make_call()
    reply = await run(clock, call, script, RetryPolicy(attempts=2))
    assert reply.status == 503 and released(reply) == 0
    assert len(script.calls) == 2 and call.attempts == 2


async def test_last_exception_reraised(clock: FakeClock) -> None:
    errors = [UpstreamError("reset", sent=True) for _ in range(3)]
    script = Next(*errors)
    call = make_call()
    with pytest.raises(UpstreamError) as caught:
        await run(clock, call, script)
    assert caught.value is errors[2]
    assert call.attempts == 3


async def test_not_in_retry_on_is_returned(clock: FakeClock) -> None:
    script = Next(answer(500), answer(200))
    reply = await run(clock, make_call(), script)
    assert reply.status == 500 and len(script.calls) == 1
    assert clock.sleeps == []


async def test_success_and_4xx_not_retried(clock: FakeClock) -> None:
    script = Next(answer(404), answer(200))
    call = make_call()
    assert (await run(clock, call, script)).status == 404
    assert len(script.calls) == 1 and call.retries == 0


async def test_post_not_retried(clock: FakeClock) -> None:
    script = Next(answer(503), answer(200))
    assert (await run(clock, make_call("POST"), script)).status == 503
    assert len(script.calls) == 1


async def test_post_reset_after_sending_not_retried(clock: FakeClock) -> None:
    script = Next(UpstreamError("reset", sent=True), answer(200))
    with pytest.raises(UpstreamError):
        await run(clock, make_call("POST"), script)
    assert len(script.calls) == 1


async def test_post_with_idempotency_key_retried(clock: FakeClock) -> None:
    script = Next(answer(503), answer(200))
    reply = await run(clock, make_call("POST", **{"Idempotency-Key": "k1"}), script)
    assert reply.status == 200 and len(script.calls) == 2


async def test_post_retried_when_nothing_was_sent(clock: FakeClock) -> None:
    script = Next(UpstreamError("connect-failure", sent=False), answer(201))
    reply = await run(clock, make_call("POST", Body(data=b"{}")), script)
    assert reply.status == 201 and len(script.calls) == 2
    assert script.bodies == [b"{}", b"{}"]


async def test_lowercase_method_is_still_idempotent(clock: FakeClock) -> None:
    script = Next(answer(503), answer(200))
    assert (await run(clock, make_call("get"), script)).status == 200


# --- bodies ---------------------------------------------------------------------------------


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_small_streamed_body_buffered_and_replayed(clock: FakeClock) -> None:
    body = Body(stream=chunks(b"ab", b"cd"))
    script = Next(answer(503), answer(200))
    reply = await run(clock, make_call("PUT", body), script)
    assert reply.status == 200
    assert script.bodies == [b"abcd", b"abcd"]


async def test_big_body_streams_once_and_is_not_retried(clock: FakeClock) -> None:
    body = Body(stream=chunks(b"x" * 40, b"y" * 40))
    script = Next(answer(503), answer(200))
    call = make_call("PUT", body)
    reply = await run(clock, call, script, RetryPolicy(max_body=64))
    assert reply.status == 503 and len(script.calls) == 1
    assert not call.body.replayable


async def test_big_body_by_content_length_not_retried(clock: FakeClock) -> None:
    body = Body(stream=chunks(b"x" * 10), length=100)
    script = Next(UpstreamError("connect-failure", sent=False), answer(200))
    with pytest.raises(UpstreamError):
        await run(clock, make_call("PUT", body), script, RetryPolicy(max_body=64))
    assert len(script.calls) == 1


async def test_single_attempt_policy_does_not_buffer(clock: FakeClock) -> None:
    body = Body(stream=chunks(b"abc"))
    script = Next(answer(200))
    call = make_call("PUT", body)
    await run(clock, call, script, RetryPolicy(attempts=1))
    assert not call.body.complete  # streamed straight through


# --- time -----------------------------------------------------------------------------------


async def test_retry_after_that_fits_is_the_delay(clock: FakeClock) -> None:
    first = answer(503, **{"Retry-After": "2"})
    script = Next(first, answer(200))
    reply = await run(clock, make_call(), script)
    assert reply.status == 200
    assert clock.sleeps == [2.0]
    assert released(first) == 1


async def test_retry_after_longer_than_time_left_returns_that_reply(clock: FakeClock) -> None:
    first = answer(503, **{"Retry-After": "30"})
    script = Next(first, answer(200))
    call = make_call()
    call.deadline = clock.now + 10
    reply = await run(clock, call, script)
    assert reply is first and released(first) == 0
    assert len(script.calls) == 1 and clock.sleeps == []


async def test_retry_after_as_http_date(clock: FakeClock) -> None:
    date = format_datetime(datetime.fromtimestamp(clock.time() + 4, UTC), usegmt=True)
    script = Next(answer(503, **{"Retry-After": date}), answer(200))
    assert (await run(clock, make_call(), script)).status == 200
    assert clock.sleeps == [pytest.approx(4.0, abs=1)]


async def test_no_retry_when_the_deadline_leaves_no_time(clock: FakeClock) -> None:
    script = Next(answer(503), answer(200))
    call = make_call()
    call.deadline = clock.now + 0.0001
    clock.advance(0.0001)  # the first attempt used it all
    assert (await run(clock, call, script)).status == 503
    assert len(script.calls) == 1


async def test_no_retry_when_the_delay_would_use_up_the_deadline(clock: FakeClock) -> None:
    policy = RetryPolicy(backoff=Backoff(base=5, max=5))
    results: list[int] = []
    for seed in range(20):
        script = Next(answer(503), answer(200))
        call = make_call()
        call.deadline = clock.now + 2.5
        retry_layer = retry(budgets=RetryBudgets({}, clock), clock=clock, rng=random.Random(seed))
        clock.sleeps.clear()
        results.append((await retry_layer(routed(call, policy), script)).status)
        assert all(s < 2.5 for s in clock.sleeps)
    assert set(results) == {200, 503}  # delays under 2.5 s retry, the others do not


# --- budget ---------------------------------------------------------------------------------


async def test_budget_bounds_retries_of_many_failing_calls(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1, window=10)
    budgets = RetryBudgets({"billing": budget}, clock)
    quick = RetryPolicy(backoff=Backoff(base=1e-6, max=1e-6))  # every call in one window
    total_attempts = 0
    total_retries = 0
    for _ in range(200):
        script = Next(*[answer(503) for _ in range(3)])
        call = make_call()
        call.deadline = clock.now + 10
        reply = await run(clock, call, script, quick, budgets=budgets)
        assert reply.status == 503 and released(reply) == 0
        total_attempts += len(script.calls)
        total_retries += call.retries
    assert total_retries == total_attempts - 200
    assert total_retries == 1 * 10 + 0.2 * 200  # min_per_second * window + ratio * requests


async def test_budget_is_per_service(clock: FakeClock) -> None:
    tight = RetryBudget(ratio=0, min_per_second=0.1, window=10)
    budgets = RetryBudgets({"billing": tight, "claims": tight}, clock)
    script = Next(answer(503), answer(503), answer(200))
    call = make_call()
    await run(clock, call, script, budgets=budgets)
    assert call.retries == 1  # one retry allowed in the window, then the answer
    other = make_call()
    other.target = "claims"
    retry_layer = retry(budgets=budgets, clock=clock)
    other.deadline = clock.now + 10
    reply = await retry_layer(routed(other, RetryPolicy()), Next(answer(503), answer(200)))
    assert reply.status == 200


# --- breaker refusals -----------------------------------------------------------------------


async def test_breaker_refusal_is_returned_and_not_counted_as_attempt(clock: FakeClock) -> None:
    refusal = problem.reply("circuit_open", "x", headers={"Retry-After": "1"})
    first = answer(503)
    script = Next(first, refusal)
    call = make_call()
    reply = await run(clock, call, script)
    assert reply is refusal
    assert call.attempts == 1
    assert released(first) == 1


async def test_policy_comes_from_the_routed_target(clock: FakeClock) -> None:
    retry_layer = retry(budgets=RetryBudgets({}, clock), clock=clock, rng=random.Random(1))
    script = Next(*[answer(503)] * 4)
    call = make_call()
    call.deadline = clock.now + 10
    await retry_layer(routed(call, RetryPolicy(attempts=4)), script)
    assert len(script.calls) == 4


# --- 429 (SPEC "Rate limits (inbound)": its Retry-After is treated as a 503's) ---------------


async def test_a_429_is_retried_exactly_after_its_retry_after(clock: FakeClock) -> None:
    first = answer(429, **{"Retry-After": "2"})
    script = Next(first, answer(200))
    reply = await run(clock, make_call(), script)
    assert reply.status == 200 and len(script.calls) == 2
    assert clock.sleeps == [2.0]  # not a moment before
    assert released(first) == 1


@pytest.mark.parametrize(("headers", "method", "policy"), [
    ({}, "GET", None),  # no Retry-After: no time to come back at
    ({"Retry-After": "20"}, "GET", None),  # past the call's deadline
    ({"Retry-After": "1"}, "POST", None),  # not safe to send twice
    ({"Retry-After": "1"}, "GET", RetryPolicy(retry_on=frozenset({"502"}))),  # 503s not retried
])
async def test_a_429_is_not_retried_when_a_503_would_not_be(
        clock: FakeClock, headers: dict[str, str], method: str, policy: RetryPolicy | None) -> None:
    script = Next(answer(429, **headers), answer(200))
    reply = await run(clock, make_call(method), script, policy)
    assert reply.status == 429 and len(script.calls) == 1


def test_a_429_is_no_failure_for_breaker_or_outliers() -> None:
    assert classify(answer(429, **{"Retry-After": "1"}), frozenset({"503"})) is Outcome.SUCCESS
