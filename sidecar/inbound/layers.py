"""Inbound-only layers: path normalisation and the hold on the app call."""

from __future__ import annotations

import asyncio

from sidecar import problem
from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.headers import TIMEOUT_MS
from sidecar.paths import BadPath, RouteTable, normalise
from sidecar.resilience.deadline import asked_timeout, pause_while_receiving
from sidecar.stack import Call, Handler, Layer, Reply, UpstreamError


def normalise_path(*, routes: RouteTable) -> Layer:
    """First inbound layer: the path the policy sees is the path the app gets.

    Decodes unreserved escapes, collapses `//`, resolves `.` and `..`; then
    sets `call.route`, the only form of the path telemetry sees. Refuses with
    400 `bad_request` (and the connection is closed) for a `..` above the
    root, an encoded slash or backslash, or a control character.
    """

    async def normalise_path_layer(call: Call, next: Handler) -> Reply:
        try:
            call.path = normalise(call.path)
        except BadPath as exc:
            call.route = "/{invalid}"
            return problem.reply("bad_request", f"The request path is not acceptable: {exc}.")
        call.route = routes.template(call.path)
        return await next(call)

    return normalise_path_layer


def hold_deadline(*, timeout: float, clock: Clock = SYSTEM_CLOCK) -> Layer:
    """Inbound: the calling sidecar's `x-sidecar-timeout-ms` bounds the app call.

    It only shortens the service's own timeout (a value that is not a positive
    whole number of milliseconds is ignored); the header is not passed on to
    the app. Expiry is answered by the failure layer as 504.
    """

    async def hold_deadline_layer(call: Call, next: Handler) -> Reply:
        budget = timeout
        for value in call.headers.popall(TIMEOUT_MS, []):
            asked = asked_timeout(value)
            if asked is not None:
                budget = min(budget, asked)
        call.deadline = clock.monotonic() + budget
        call.attempts = 1  # the one call to the app

        def restart() -> float:
            call.deadline = clock.monotonic() + budget
            return budget

        scope = asyncio.timeout(budget)
        try:
            async with scope:
                pause_while_receiving(call, scope, restart=restart)
                return await next(call)
        except TimeoutError:
            if not scope.expired():
                raise
            raise UpstreamError("timeout", sent=True) from None

    return hold_deadline_layer
