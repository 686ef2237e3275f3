import asyncio
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict

from sidecar.clock import FakeClock
from sidecar.config.settings import ServicePolicy
from sidecar.http.headers import TIMEOUT_MS as TIMEOUT_HEADER
from sidecar.resilience.deadline import (
    asked_timeout,
    deadline,
    hold_deadline,
    per_attempt,
    remaining,
)
from sidecar.stack import Call, Reply, UpstreamError
from tests.support.calls import Next, ok, target
from tests.support.calls import make_call as support_call


def make_call(timeout: float = 10.0, per_try: float = 3.0, mesh: bool = True,
              **headers: str) -> Call:
    """A call routed to `billing` with these settings."""
    to = target("billing", timeout=timeout, per_try_timeout=per_try, mesh=mesh)
    return support_call("/claims", headers=headers, to=to)


async def hang_after(clock: FakeClock, seconds: float) -> None:
    clock.advance(seconds)
    await asyncio.Event().wait()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250", 0.25),
        (" 1000 ", 1.0),
        ("0", None),
        ("-5", None),
        ("1.5", None),
        ("abc", None),
        ("", None),
        ("٣", None),
        ("9" * 11, None),
        ("9" * 5000, None),
        (None, None),
    ],
)
def test_asked_timeout_parses_positive_millis_only(
    value: str | None, seconds: float | None
) -> None:
    assert asked_timeout(value) == seconds


def test_remaining(clock: FakeClock) -> None:
    call = make_call()
    assert remaining(call, clock) is None
    call.deadline = clock.now + 2
    assert remaining(call, clock) == 2
    clock.advance(5)
    assert remaining(call, clock) == 0


async def test_deadline_is_now_plus_timeout(clock: FakeClock) -> None:
    seen: list[float | None] = []

    async def next(call: Call) -> Reply:
        seen.append(call.deadline)
        return ok()

    layer = deadline(clock=clock)
    await layer(make_call(timeout=10.0), next)
    assert seen == [clock.now + 10.0]


async def test_header_shortens_and_is_removed(clock: FakeClock) -> None:
    next = Next()
    layer = deadline(clock=clock)
    await layer(make_call(timeout=10.0, **{TIMEOUT_HEADER: "1500"}), next)
    assert next.calls[0].deadline == clock.now + 1.5
    assert TIMEOUT_HEADER not in next.calls[0].headers


async def test_header_never_lengthens(clock: FakeClock) -> None:
    seen: list[float | None] = []

    async def next(call: Call) -> Reply:
        seen.append(call.deadline)
        return ok()

    layer = deadline(clock=clock)
    call = make_call(timeout=2.0, **{TIMEOUT_HEADER: "60000"})
    await layer(call, next)
    assert seen == [clock.now + 2.0]
    assert TIMEOUT_HEADER not in call.headers


@pytest.mark.parametrize("values", [["5000", "1500"], ["1500", "5000"], ["soon", "1500"]])
async def test_of_two_headers_the_shorter_holds_in_either_order(
    clock: FakeClock, values: list[str]
) -> None:
    call = make_call(timeout=10.0)
    for value in values:
        call.headers.add(TIMEOUT_HEADER, value)
    seen: list[float | None] = []

    async def next(call: Call) -> Reply:
        seen.append(call.deadline)
        return ok()

    await deadline(clock=clock)(call, next)
    assert seen == [clock.now + 1.5]
    assert TIMEOUT_HEADER not in call.headers


async def test_invalid_header_is_ignored_and_removed(clock: FakeClock) -> None:
    layer = deadline(clock=clock)
    call = make_call(timeout=3.0, **{TIMEOUT_HEADER: "soon"})
    await layer(call, Next())
    assert call.deadline == clock.now + 3.0
    assert TIMEOUT_HEADER not in call.headers


async def test_overrun_answers_504(loop_on: FakeClock) -> None:
    clock = loop_on
    layer = deadline(clock=clock)

    async def slow(call: Call) -> Reply:
        await hang_after(clock, 2.5)
        return ok()

    reply = await layer(make_call(timeout=2.0), slow)
    assert reply.status == 504
    assert reply.reason == "upstream_timeout"
    assert reply.made_here
    assert b"2000 ms" in reply.body  # type: ignore[operator]


async def test_overrun_detail_does_not_echo_the_header(loop_on: FakeClock) -> None:
    clock = loop_on
    layer = deadline(clock=clock)

    async def slow(call: Call) -> Reply:
        await hang_after(clock, 1)
        return ok()

    reply = await layer(make_call(timeout=5.0, **{TIMEOUT_HEADER: "777"}), slow)
    assert reply.status == 504
    assert b"777" not in reply.body  # type: ignore[operator]


async def test_inner_timeout_error_becomes_504(clock: FakeClock) -> None:
    next = Next(UpstreamError("timeout", sent=True))
    reply = await deadline(clock=clock)(make_call(timeout=1.0), next)
    assert reply.status == 504


async def test_other_errors_pass_through(clock: FakeClock) -> None:
    next = Next(UpstreamError("reset", sent=True))
    with pytest.raises(UpstreamError):
        await deadline(clock=clock)(make_call(timeout=1.0), next)

    foreign_timeout = Next(TimeoutError())  # not ours: must not be mistaken for the deadline
    with pytest.raises(TimeoutError):
        await deadline(clock=clock)(make_call(timeout=1.0), foreign_timeout)


def test_deadline_rejects_nonpositive_timeout(clock: FakeClock) -> None:
    # The setting is checked once, where it is made (the loader refuses it too).
    with pytest.raises(ValueError):
        ServicePolicy(timeout=0.0)


async def test_per_attempt_sends_time_left_to_far_sidecar(clock: FakeClock) -> None:
    next = Next()
    layer = per_attempt(clock=clock)
    call = make_call(per_try=3.0)
    call.deadline = clock.now + 10
    await layer(call, next)
    call.deadline = clock.now + 1.2345
    await layer(call, next)
    # The far side is told a little less than the call's time left (50 ms, or
    # a tenth of a short bound), so its own answer arrives first. Not the
    # per-try bound: the far side holds the whole answer, body included, to it.
    call.deadline = clock.now + 0.2
    await layer(call, next)
    assert [headers[TIMEOUT_HEADER] for headers in next.headers] == ["9950", "1184", "180"]
    assert call.headers.getall(TIMEOUT_HEADER) == ["180"]  # replaced, not added


async def test_per_attempt_outside_mesh_sends_no_header(clock: FakeClock) -> None:
    next = Next()
    layer = per_attempt(clock=clock)
    assert (await layer(make_call(per_try=3.0, mesh=False), next)).status == 200
    assert TIMEOUT_HEADER not in next.headers[0]


async def test_per_attempt_expiry_is_per_try_timeout(loop_on: FakeClock) -> None:
    clock = loop_on
    layer = per_attempt(clock=clock)
    call = make_call(per_try=1.0)
    call.deadline = clock.now + 10

    async def slow(call: Call) -> Reply:
        await hang_after(clock, 1.5)
        return ok()

    with pytest.raises(UpstreamError) as caught:
        await layer(call, slow)
    assert caught.value.kind == "per-try-timeout"
    assert caught.value.sent


async def test_per_attempt_expiry_on_deadline_is_timeout(loop_on: FakeClock) -> None:
    clock = loop_on
    layer = per_attempt(clock=clock)
    call = make_call(per_try=3.0)
    call.deadline = clock.now + 0.5

    async def slow(call: Call) -> Reply:
        await hang_after(clock, 1)
        return ok()

    with pytest.raises(UpstreamError) as caught:
        await layer(call, slow)
    assert caught.value.kind == "timeout"


async def test_per_attempt_with_no_time_left_sends_nothing(clock: FakeClock) -> None:
    next = Next()
    call = make_call(per_try=3.0)
    call.deadline = clock.now - 1
    with pytest.raises(UpstreamError) as caught:
        await per_attempt(clock=clock)(call, next)
    assert caught.value.kind == "timeout" and not caught.value.sent
    assert next.calls == []


async def test_deadline_and_per_attempt_together_answer_504(loop_on: FakeClock) -> None:
    clock = loop_on
    outer = deadline(clock=clock)
    inner = per_attempt(clock=clock)

    async def slow(call: Call) -> Reply:
        await hang_after(clock, 2)
        return ok()

    async def chain(call: Call) -> Reply:
        return await inner(call, slow)

    reply = await outer(make_call(timeout=1.0, per_try=3.0), chain)
    assert reply.status == 504


def streaming(clock: FakeClock, *, then_hang_for: float | None) -> Reply:
    """An answer whose body sends one chunk, then another at once or after a long wait."""

    async def body() -> AsyncIterator[bytes]:
        yield b"begun"
        if then_hang_for is not None:
            await hang_after(clock, then_hang_for)
        yield b"done"

    return Reply(status=200, headers=CIMultiDict(), body=body())


async def read_all(reply: Reply) -> list[bytes]:
    assert not isinstance(reply.body, bytes)
    return [chunk async for chunk in reply.body]


async def test_deadline_cuts_a_body_still_coming_when_it_passes(loop_on: FakeClock) -> None:
    clock = loop_on
    layer = deadline(clock=clock)

    async def whole(call: Call) -> Reply:
        return streaming(clock, then_hang_for=None)

    assert await read_all(await layer(make_call(timeout=1.0), whole)) == [b"begun", b"done"]

    async def stalling(call: Call) -> Reply:
        return streaming(clock, then_hang_for=2.0)

    reply = await layer(make_call(timeout=1.0), stalling)
    assert reply.status == 200  # begun: too late for a 504
    with pytest.raises(ConnectionResetError):
        await read_all(reply)


async def test_the_inbound_hold_cuts_the_apps_body_when_it_passes(loop_on: FakeClock) -> None:
    clock = loop_on
    layer = hold_deadline(clock=clock)
    call = support_call("/claims", direction="inbound", headers={TIMEOUT_HEADER: "300"},
                        to=target("app", timeout=10.0))

    async def app(call: Call) -> Reply:
        return streaming(clock, then_hang_for=1.0)

    reply = await layer(call, app)
    chunks: list[bytes] = []
    with pytest.raises(ConnectionResetError):
        assert not isinstance(reply.body, bytes)
        async for chunk in reply.body:
            chunks.append(chunk)
    assert chunks == [b"begun"]
