"""The one place inbound traffic goes: this service's app."""

from __future__ import annotations

from sidecar.stack import Call, Handler, Layer, Reply, Target


def to_app(*, app: Target) -> Layer:
    """Inbound: routes every call to the app on loopback (`inbound.app`).

    Sets `call.upstream` (its settings are `defaults`: timeout, connect
    timeout) and `call.endpoint` for the transport. Refuses nothing.
    """
    endpoint = app.service.endpoints[0]

    async def to_app_layer(call: Call, next: Handler) -> Reply:
        call.upstream = app
        call.endpoint = endpoint
        return await next(call)

    return to_app_layer
