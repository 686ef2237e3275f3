"""The inbound path normalisation layer."""

from __future__ import annotations

from sidecar.inbound.normalise import normalise_path
from sidecar.paths import RouteTable
from tests.support.calls import Next, make_call


async def test_normalise_path_gives_the_app_the_path_the_policy_saw() -> None:
    layer = normalise_path(routes=RouteTable(()))
    downstream = Next()
    await layer(make_call("/claims//7/./%61", direction="inbound"), downstream)
    assert downstream.calls[0].path == "/claims/7/a"
    bad = await layer(make_call("/claims/..%2F..%2Fetc", direction="inbound"), downstream)
    assert bad.status == 400 and bad.reason == "bad_request"
    assert len(downstream.calls) == 1
