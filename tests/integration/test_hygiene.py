"""Paths and header names that mean one thing to the sidecar and another to the app.

Through two real sidecar processes: `a` (outbound) calls `b` (inbound), whose
app counts what it receives.
"""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from tests.integration.test_core import two_sidecars, wait_for_audit

pytestmark = pytest.mark.timeout(90)

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
