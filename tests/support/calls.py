"""The one way unit tests make a `Call`, a routed `Target` and a scripted `next`."""

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
              to: Target | None = None, target_name: str | None = None) -> Call:
    """A call as the edge makes it; `to` routes it (sets `upstream` and `target`)."""
    sent: CIMultiDict[str] = CIMultiDict()
    if host is not None:
        sent["Host"] = host
    sent.extend(headers or {})
    call = Call(direction=direction, method=method, path=path, query=query, headers=sent,
                body=body or Body.empty(), source=source)
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
    """A scripted `next` that records the calls it saw and answers `reply` (or raises it)."""

    def __init__(self, reply: Reply | Exception | None = None) -> None:
        self.calls: list[Call] = []
        self.reply = reply or ok()

    async def __call__(self, call: Call) -> Reply:
        self.calls.append(call)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply
