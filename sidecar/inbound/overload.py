"""An inbound concurrency cap: at most `inbound.max_in_flight` calls at the app at once.

Past the cap the call is answered 503 `overloaded` at once instead of
queueing without bound in front of an app that is already behind (Envoy's
`max_requests` overflow and its overload manager answer the same way).
"""

from __future__ import annotations

from sidecar.http import problem
from sidecar.stack import Call, Handler, Layer, Reply


class InFlight:
    """Calls at the app now; lives as long as the process, so a reload keeps the count."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def cap_in_flight(*, in_flight: InFlight, max_in_flight: int) -> Layer:
    """Inbound, just before the app: admits the call while fewer than `max_in_flight`
    are there, else 503 `overloaded`. A slot is freed when the app's response begins,
    so a long streamed body does not hold it."""

    async def cap_in_flight_layer(call: Call, next: Handler) -> Reply:
        if in_flight.count >= max_in_flight:
            return problem.reply(
                "overloaded",
                f"The app already has {max_in_flight} calls in hand (inbound.max_in_flight). "
                "Try again shortly; a retry with backoff will do.",
            )
        in_flight.count += 1
        try:
            return await next(call)
        finally:
            in_flight.count -= 1

    return cap_in_flight_layer
