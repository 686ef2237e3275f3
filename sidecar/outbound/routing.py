"""Names the target service of an app's call (SPEC "Addressing a service").

The first rule that matches wins and no rule falls through to the next:
absolute-form target, then a Host that names a service, then a Host that is
the sidecar itself with the service as the first path segment. Anything else
is 404 `no_route`, and nothing is dialled: the sidecar is never an open proxy.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.http import problem
from sidecar.names import API_PREFIX
from sidecar.paths import RouteTable
from sidecar.stack import Call, Handler, Layer, Reply, Target

GENERIC_ROUTES = RouteTable(())


def host_name(authority: str) -> str:
    """`billing-engine:8080` -> `billing-engine`; `[::1]:15001` -> `::1`.

    An authority with userinfo names nothing (`""`): the host of
    `billing:80@elsewhere` is `elsewhere`, and such a target is a trick, not
    a call (RFC 9110 4.2.4: a recipient treats userinfo as an error).
    """
    authority = authority.strip().lower()
    if "@" in authority:
        return ""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    if authority.count(":") == 1:
        return authority.partition(":")[0]
    return authority


def resolve(call: Call, targets: Mapping[str, Target], local_hosts: frozenset[str]
            ) -> tuple[Target | None, str]:
    """The target of `call` and the path to send, or (None, path) when nothing matches."""
    if call.absolute_host is not None:
        return targets.get(host_name(call.absolute_host)), call.path
    host = host_name(call.headers.get("Host", ""))
    if host in targets:
        return targets[host], call.path
    if host in local_hosts:
        first, sep, rest = call.path.lstrip("/").partition("/")
        target = targets.get(first.lower())
        return target, "/" + rest if sep else "/"
    return None, call.path


def sidecar_api(*, api: Handler, local_hosts: frozenset[str]) -> Layer:
    """Outbound, before routing: answers `/_sidecar/v1/...` with `api` (the workflows API)
    when the call addresses the sidecar itself (its own Host, origin form); any other
    call passes on, so an absolute-form or Host-named call to a service is routed
    as always. Refuses nothing itself.
    """

    async def sidecar_api_layer(call: Call, next: Handler) -> Reply:
        if (call.absolute_host is None
                and (call.path.startswith(API_PREFIX) or call.path == API_PREFIX[:-1])
                and host_name(call.headers.get("Host", "")) in local_hosts):
            return await api(call)
        return await next(call)

    return sidecar_api_layer


def route(*, targets: Mapping[str, Target], local_hosts: frozenset[str]) -> Layer:
    """Outbound: sets `call.target`, `call.route` and `call.upstream`, the routed target
    whose settings every inner layer reads.

    Refuses with 404 `no_route` when the call names no configured service.
    """

    async def route_layer(call: Call, next: Handler) -> Reply:
        target, path = resolve(call, targets, local_hosts)
        if target is None:
            call.target = "unknown"
            call.route = GENERIC_ROUTES.template(call.path)
            return problem.reply(
                "no_route",
                "The call names no service this sidecar knows. Address a service listed "
                "under `services` in the sidecar config: http://localhost:15001/<service>/...,"
                " Host: <service>, or an absolute URL http://<service>/...",
            )
        call.target = target.name
        call.path = path
        call.route = target.routes.template(path)
        call.upstream = target
        return await next(call)

    return route_layer
