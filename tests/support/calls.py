"""The one way unit tests make a `Call`, a routed `Target`, a `Reply` and a scripted `next`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from multidict import CIMultiDict

from sidecar.config.settings import RetryPolicy, Service, ServicePolicy
from sidecar.paths import RouteTable
from sidecar.stack import Body, Call, Direction, Reply, Target


def target(name: str = "billing", *, timeout: float | None = None,
           per_try_timeout: float | None = None, retry: RetryPolicy | None = None,
           connect_timeout: float | None = None, mesh: bool = True,
           routes: tuple[str, ...] = (), endpoints: tuple[str, ...] | None = None) -> Target:
    """A routed target whose settings are the defaults but for what is named."""
    policy = ServicePolicy()
    changes: dict[str, Any] = {}
    if timeout is not None:
        changes["timeout"] = timeout
    if connect_timeout is not None:
        changes["connect_timeout"] = connect_timeout
    retry = retry or policy.retry
    if per_try_timeout is not None:
        retry = dataclasses.replace(retry, per_try_timeout=per_try_timeout)
    changes["retry"] = retry
    service = Service(name=name, endpoints=endpoints or (f"http://{name}:15006",),
                      policy=dataclasses.replace(policy, **changes), routes=routes, mesh=mesh)
    return Target(service=service, routes=RouteTable(routes))


def make_call(path: str = "/", *, method: str = "GET", direction: Direction = "outbound",
              headers: Mapping[str, str] | None = None, host: str | None = None,
              query: str = "", body: Body | None = None, source: str = "anonymous",
              to: Target | None = None, target_name: str | None = None, route: str = "/",
              absolute_host: str | None = None) -> Call:
    """A call as the edge makes it; `to` routes it (sets `upstream` and `target`).

    `route` is the templated path routing would have set; `absolute_host` the
    authority of an absolute-form request line.
    """
    sent: CIMultiDict[str] = CIMultiDict()
    if host is not None:
        sent["Host"] = host
    sent.extend(headers or {})
    call = Call(direction=direction, method=method, path=path, query=query, headers=sent,
                body=body or Body.empty(), source=source, route=route,
                absolute_host=absolute_host)
    if to is not None:
        call.upstream = to
        call.target = to.name
        call.endpoint = to.service.endpoints[0]
    if target_name is not None:
        call.target = target_name
    return call


def ok(status: int = 200, reason: str | None = None) -> Reply:
    return Reply(status=status, headers=CIMultiDict(), reason=reason)


class Next:
    """A scripted `next`: records every call it sees and answers from `replies`.

    Given one reply (`ok()` when none), it answers that to every call; given
    several, it answers them in turn, once each, and a call past the last fails
    the test. An exception among them is raised instead of answered. It takes
    each call's body as the transport does (a stream can be taken only once):
    `bodies` holds those that were held bytes. `headers` keeps a copy of each
    call's headers as they were when it came, since a layer may rewrite them
    before the next attempt.
    """

    def __init__(self, *replies: Reply | BaseException) -> None:
        self.calls: list[Call] = []
        self.headers: list[CIMultiDict[str]] = []
        self.bodies: list[bytes] = []
        self._replies = list(replies) or [ok()]
        self._repeat = len(self._replies) == 1

    async def __call__(self, call: Call) -> Reply:
        self.calls.append(call)
        self.headers.append(CIMultiDict(call.headers))
        payload = call.body.payload()
        if isinstance(payload, bytes):
            self.bodies.append(payload)
        if self._repeat:
            reply = self._replies[0]
        else:
            assert self._replies, f"call {len(self.calls)} is past the scripted replies"
            reply = self._replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply
