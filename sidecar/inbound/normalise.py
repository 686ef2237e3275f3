"""Inbound path normalisation: the path the policy judges is the path the app gets."""

from __future__ import annotations

from sidecar.http import problem
from sidecar.paths import BadPath, RouteTable, normalise
from sidecar.stack import Call, Handler, Layer, Reply


def normalise_path(*, routes: RouteTable) -> Layer:
    """First inbound layer: the path the policy sees is the path the app gets.

    Decodes unreserved escapes, collapses `//`, resolves `.` and `..`; then
    sets `call.route`, the only form of the path telemetry sees. Refuses with
    400 `bad_request` (and the connection is closed) for a `..` above the
    root, a dot segment with path parameters (`..;`), an encoded slash or
    backslash, or a control character.
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

