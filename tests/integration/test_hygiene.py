"""Paths and header names that mean one thing to the sidecar and another to the app.

Through two real sidecar processes: `a` (outbound) calls `b` (inbound), whose
app counts what it receives.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.integration.test_core import two_sidecars, wait_for_audit

pytestmark = pytest.mark.timeout(90)

# Look-alikes of the sidecar's own names, as WSGI and CGI servers read them.
LOOK_ALIKES = {
    "x_source_service": "svc-c",
    "X_Service_Token": "forged",
    "x-sidecar_timeout_ms": "1",
    "x_sidecar_reason": "policy_denied",
}


DOT_PARAMETERS = ["/b/claims/..;/admin", "/b/claims/..;jsessionid=7/admin", "/b/claims/.;/admin",
                  "/b/claims/%2e%2e;/admin", "/b/claims/..%3b/admin", "/b/claims/.%3B/admin"]


async def test_dot_segments_with_path_parameters_are_refused_before_the_policy(
    make_mesh, upstreams
):
    # `/claims/*` is allowed; Tomcat and Spring would resolve these to `/admin`.
    a, b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        for path in DOT_PARAMETERS:
            async with session.get(URL(a.outbound_url + path, encoded=True)) as response:
                assert response.status == 400, path
                assert response.headers["x-sidecar-reason"] == "bad_request", path
                assert "admin" not in await response.text(), path
    assert app_b.seen == []
    records = await wait_for_audit(b, len(DOT_PARAMETERS))
    assert {(r["decision"], r["reason"]) for r in records} == {("denied", "bad_request")}


async def test_look_alike_header_names_are_dropped_both_ways(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({}, headers={**LOOK_ALIKES, "x_request_id": "kept"})

    app_b.script = answer
    async with aiohttp.ClientSession() as session:
        headers = {**LOOK_ALIKES, "x_request_id": "kept"}
        async with session.get(a.outbound_url + "/b/claims/1", headers=headers) as response:
            assert response.status == 200
            got = {name.lower() for name in response.headers}
    [seen] = app_b.seen
    assert seen.headers["x-source-service"] == "a"
    for name in LOOK_ALIKES:
        assert name.lower() not in seen.headers
        assert name.lower() not in got
    # Names that are not the sidecar's travel as they are, both ways.
    assert seen.headers["x_request_id"] == "kept" and "x_request_id" in got
