"""Time limits: one deadline for the whole call, and a bound on each attempt.

`deadline` sits outside bulkhead and retry so that waiting for a slot, every
attempt and every delay between attempts all spend the same budget; it bounds
the answer's body too, as Envoy's route timeout does. `per_attempt` sits
innermost, next to the transport, so it bounds exactly one wait for an answer
to begin, and tells the far sidecar how long it may hold the whole exchange.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.http import problem
from sidecar.http.headers import TIMEOUT_MS
from sidecar.stack import Call, Handler, Layer, Reply, UpstreamError
from sidecar.timer import ATTEMPT, CALL, Bound, CallTimer

FAR_SIDE_MARGIN = 0.05


def remaining(call: Call, clock: Clock) -> float | None:
    """Seconds left before `call.deadline` (never negative), or None without a deadline."""
    if call.deadline is None:
        return None
    return max(0.0, call.deadline - clock.monotonic())


def asked_timeout(value: str | None) -> float | None:
    """The app's `x-sidecar-timeout-ms` in seconds, or None when absent or not valid.

    Only a positive whole number of milliseconds counts. `0` is ignored
    rather than read as "no time at all": proxies that know this kind of
    header read 0 as "no limit", and ignoring it keeps the configured limit.
    """
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    millis = int(value)
    return millis / 1000 if millis > 0 else None


def shortest_asked(values: list[str]) -> float | None:
    """The shortest valid `x-sidecar-timeout-ms` among `values`, or None.

    Two headers are read as two asks: the shorter one holds, whichever came first.
    """
    asked = [seconds for seconds in map(asked_timeout, values) if seconds is not None]
    return min(asked, default=None)


def deadline(*, clock: Clock) -> Layer:
    """Sets `call.deadline` and answers 504 `upstream_timeout` when it passes.

    The limit is the routed target's `timeout`, shortened (never lengthened) by the
    app's `x-sidecar-timeout-ms`, which is then removed: the far sidecar gets
    the time left from `per_attempt` instead. Sits outside bulkhead and retry
    so the limit covers queueing, every attempt and every delay. An inner
    `UpstreamError("timeout")` (an attempt cut short by this same deadline)
    gets the same answer. When the deadline passes while the answer's body
    is still coming, the body breaks off (`until_deadline`). The bound is
    kept on the call's one timer (`sidecar.timer`), not a scope of its own.
    """

    async def deadline_layer(call: Call, next: Handler) -> Reply:
        assert call.upstream is not None, "deadline sits inside routing"
        limit = call.upstream.policy.timeout
        asked = shortest_asked(call.headers.popall(TIMEOUT_MS, []))
        shortened = asked is not None and asked < limit
        if asked is not None:
            limit = min(limit, asked)
        ends = clock.monotonic() + limit
        call.deadline = ends if call.deadline is None else min(call.deadline, ends)
        timer = call.timed()
        timer.set(CALL, remaining(call, clock))

        def restart() -> float:
            call.deadline = clock.monotonic() + limit
            return limit

        def pause() -> None:
            call.deadline = None

        pause_while_receiving(call, timer, CALL, restart=restart, pause=pause)
        try:
            reply = await _held(call, next, timer)
        except UpstreamError as exc:
            if exc.kind != "timeout":
                raise
            reply = None
        if reply is None:
            reply = _timed_out(call.target, limit, shortened)
        return until_deadline(reply, timer)

    return deadline_layer


def until_deadline(reply: Reply, timer: CallTimer) -> Reply:
    """`reply`, its streamed body breaking off once the call's deadline has passed.

    The answer has begun by then, so there is no 504 to give: the body ends
    as `ConnectionResetError`, which the edge turns into an aborted
    connection, so a cut answer never looks complete (SPEC `upstream_reset`).
    """
    if not isinstance(reply.body, bytes):
        reply.body = _bounded(reply.body, timer)
    return reply


async def _bounded(body: AsyncIterator[bytes], timer: CallTimer) -> AsyncIterator[bytes]:
    chunks = body.__aiter__()
    while True:
        # While the request body is still coming in the deadline stands
        # still (the bound is lifted), and it restarts after.
        timer.watch()
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if timer.take(CALL) is None:
                raise
            raise ConnectionResetError("the call's deadline passed mid-body") from None
        finally:
            timer.unwatch()
        yield chunk


async def _held(call: Call, next: Handler, timer: CallTimer) -> Reply | None:
    """`next(call)`, cut short when the call's bound on `timer` passes (then None)."""
    timer.watch()
    try:
        return await next(call)
    except asyncio.CancelledError:
        if timer.take(CALL) is None:
            raise
        return None
    finally:
        timer.unwatch()


def _timed_out(service: str, limit: float, shortened: bool) -> Reply:
    # The app's own header value is request data and is never echoed.
    if shortened:
        why = "the time the caller allowed in x-sidecar-timeout-ms"
    else:
        why = f"its timeout of {round(limit * 1000)} ms"
    return problem.reply(
        "upstream_timeout",
        f"The call to {service} did not complete within {why}, retries included. "
        f"Raise `timeout` for {service} in the sidecar config, or find why it is slow.",
    )


def per_attempt(*, clock: Clock) -> Layer:
    """Bounds one attempt's wait for its answer to begin to the target's
    `retry.per_try_timeout` or the time left, whichever is less.

    Sits innermost, just before the transport. When the bound passes it
    raises `UpstreamError("per-try-timeout", sent=True)`, or
    `UpstreamError("timeout", sent=True)` when the call's own deadline was
    the tighter bound (so retry sees no time left and the deadline layer
    answers 504). Once the answer has begun it bounds nothing more (no retry
    can follow; Envoy's per-try timeout stops there too): the body is the
    call deadline's. For mesh targets it sends that time left, in whole
    milliseconds, as `x-sidecar-timeout-ms`, since the far sidecar holds its
    whole call to its app, body included, to the header; services outside
    the mesh never see it.
    """

    async def per_attempt_layer(call: Call, next: Handler) -> Reply:
        assert call.upstream is not None, "per_attempt sits inside routing"
        per_try = call.upstream.policy.retry.per_try_timeout
        bound, by_deadline = _attempt_bound(per_try, remaining(call, clock))
        if bound <= 0:
            raise UpstreamError("timeout", sent=False)
        call.headers.popall(TIMEOUT_MS, None)
        if call.upstream.mesh:
            # The far side gives up a little before we do (50 ms, or a tenth of
            # a short bound), so its own 504 and reason reach the app first.
            # It is told the call's time left, not this attempt's: a per-try
            # bound would cut every answer whose body takes longer than it.
            left = remaining(call, clock)
            held = bound if left is None else left
            margin = min(FAR_SIDE_MARGIN, held / 10)
            call.headers[TIMEOUT_MS] = str(max(1, int((held - margin) * 1000)))
        timer = call.timed()
        timer.set(ATTEMPT, bound)

        def restart() -> float:
            nonlocal by_deadline
            seconds, by_deadline = _attempt_bound(per_try, remaining(call, clock))
            return seconds

        pause_while_receiving(call, timer, ATTEMPT, restart=restart)
        timer.watch()
        try:
            return await next(call)
        except asyncio.CancelledError:
            passed = timer.take(ATTEMPT, CALL)
            if passed is None:
                raise
            kind = "timeout" if by_deadline or passed == CALL else "per-try-timeout"
            raise UpstreamError(kind, sent=True) from None
        finally:
            timer.unwatch()
            timer.set(ATTEMPT, None)

    return per_attempt_layer


def _attempt_bound(per_try: float, left: float | None) -> tuple[float, bool]:
    """The attempt's bound, and whether the call's deadline is what sets it."""
    if left is not None and left <= per_try:
        return left, True
    return per_try, False


def pause_while_receiving(
    call: Call,
    timer: CallTimer,
    bound: Bound,
    *,
    restart: Callable[[], float],
    pause: Callable[[], None] | None = None,
) -> None:
    """While the client is still sending the request body, `bound` stands still.

    Time spent waiting on the client is not the upstream's (Envoy likewise
    starts its route timeout once the request is in): a slow upload is not
    cut short and counts against no breaker. When the body is all in, the
    bound passes `restart()` seconds later.
    """
    if call.body.complete:
        return  # nothing left to wait for (the common case: no body at all)

    def stop() -> None:
        if pause is not None:
            pause()
        timer.set(bound, None)

    def start() -> None:
        timer.set(bound, restart())

    call.body.watch(stop, start)


def hold_deadline(*, clock: Clock = SYSTEM_CLOCK) -> Layer:
    """Inbound: the calling sidecar's `x-sidecar-timeout-ms` bounds the app call.

    It only shortens the app target's timeout (`defaults.timeout`) (a value that is not a positive
    whole number of milliseconds is ignored); the header is not passed on to
    the app. Expiry before the app's answer begins is answered by the failure
    layer as 504; after, the answer's body breaks off (`until_deadline`).
    """

    async def hold_deadline_layer(call: Call, next: Handler) -> Reply:
        assert call.upstream is not None, "hold_deadline sits inside to_app"
        budget = call.upstream.policy.timeout
        asked = shortest_asked(call.headers.popall(TIMEOUT_MS, []))
        if asked is not None:
            budget = min(budget, asked)
        call.deadline = clock.monotonic() + budget
        call.attempts = 1  # the one call to the app
        timer = call.timed()
        timer.set(CALL, budget)

        def restart() -> float:
            call.deadline = clock.monotonic() + budget
            return budget

        pause_while_receiving(call, timer, CALL, restart=restart)
        reply = await _held(call, next, timer)
        if reply is None:
            raise UpstreamError("timeout", sent=True)
        return until_deadline(reply, timer)

    return hold_deadline_layer
