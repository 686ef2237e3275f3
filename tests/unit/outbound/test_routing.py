"""Routing: which target a call is for, and the layer that refuses one it cannot route."""

from __future__ import annotations

import pytest

from sidecar.outbound.routing import resolve, route
from sidecar.stack import Target
from tests.support.calls import Next, make_call, target

LOCAL = frozenset({"localhost", "127.0.0.1"})


def targets(*names: str, routes: tuple[str, ...] = ()) -> dict[str, Target]:
    return {n: target(n, routes=routes) for n in names}


def test_absolute_form_wins_and_never_falls_through() -> None:
    table = targets("billing", "other")
    found, path = resolve(make_call("/claims", host="other", absolute_host="billing"),
                          table, LOCAL)
    assert found is not None and found.service.name == "billing" and path == "/claims"
    found, _ = resolve(make_call("/claims", host="other", absolute_host="nowhere"), table, LOCAL)
    assert found is None


def test_host_header_then_first_segment() -> None:
    table = targets("billing")
    found, path = resolve(make_call("/claims/1", host="Billing:8080"), table, LOCAL)
    assert found is not None and path == "/claims/1"
    found, path = resolve(make_call("/billing/claims/1", host="localhost:15001"), table, LOCAL)
    assert found is not None and path == "/claims/1"
    found, path = resolve(make_call("/billing", host="127.0.0.1"), table, LOCAL)
    assert found is not None and path == "/"
    found, _ = resolve(make_call("/billing/claims", host="example.com"), table, LOCAL)
    assert found is None


async def test_route_layer_answers_no_route_without_calling_next() -> None:
    downstream = Next()
    layer = route(targets=targets("billing"), local_hosts=LOCAL)
    reply = await layer(make_call("/unknown/x", host="localhost"), downstream)
    assert reply.status == 404 and reply.reason == "no_route"
    assert downstream.calls == []
    reply = await layer(make_call("/billing/patients/MRN12345678", host="localhost"), downstream)
    assert reply.status == 200
    assert downstream.calls[0].target == "billing"
    assert downstream.calls[0].route == "/patients/{id}"


@pytest.mark.parametrize("authority", ["billing:80@elsewhere", "user@billing",
                                       "billing@127.0.0.1", "user:pass@billing:80"])
def test_an_authority_with_userinfo_names_no_service(authority: str) -> None:
    table = targets("billing")
    found, _ = resolve(make_call("/claims", host="other", absolute_host=authority), table, LOCAL)
    assert found is None
    found, _ = resolve(make_call("/billing/claims", host=authority), table, LOCAL)
    assert found is None
