"""What an upstream writes in `x-sidecar-*` reaches neither the app nor the audit as it came.

Only a sidecar speaks for a call, and only with a code of SPEC's table: a
`mesh: false` service, an endpoint that is not a real sidecar, or an app
behind a real one may write anything in `x-sidecar-reason`, including patient
identifiers. The calling sidecar relays a table code from a mesh target only;
free text and every other upstream `x-sidecar-*` header are dropped, and the
audit records a table code or null.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

pytestmark = pytest.mark.timeout(60)

FREE_TEXT = "MRN-998877 ssn 123-45-6789"
SECRETS = ("MRN-998877", "123-45-6789")
POLICY = [{"from": ["a"], "methods": ["GET"], "paths": ["/claims", "/claims/*"]}]


async def impostor(request: web.Request) -> web.StreamResponse:
    """Not a sidecar: answers in a sidecar's headers, with free text or with a table code."""
    if request.path.endswith("/free"):
        return web.Response(status=503, headers={
            "x-sidecar-reason": FREE_TEXT, "x-sidecar-attempts": "7",
            "x-sidecar-debug": FREE_TEXT})
    return web.Response(status=403, headers={"x-sidecar-reason": "policy_denied"})


async def test_only_table_codes_from_mesh_targets_reach_the_app_and_the_audit(
        make_mesh, upstreams):
    mesh = make_mesh(["a", "b"])
    liar = await upstreams(script=impostor).start()
    app_b = await upstreams(script=impostor).start()
    b = mesh.sidecar("b", inbound={"app": app_b.url, "policy": POLICY})
    await b.start()
    once = {"retry": {"attempts": 1}}
    a = mesh.sidecar("a", services={
        "plain": {"endpoints": [liar.url], "mesh": False, **once},
        "fake": {"endpoints": [liar.url], **once},
        "b": {"endpoints": [b.inbound_url], **once},
    })
    await a.start()

    calls = [
        ("/plain/x/free", 503, None),  # mesh: false: free text dropped
        ("/plain/x/code", 403, None),  # mesh: false: not even a table code
        ("/fake/x/free", 503, None),  # a mesh endpoint that is no sidecar: free text dropped
        ("/fake/x/code", 403, "policy_denied"),  # a table code from a mesh target passes
        ("/b/claims/free", 503, None),  # b's app may not speak for b's sidecar
        ("/b/denied", 403, "policy_denied"),  # b's own refusal is relayed
    ]
    async with aiohttp.ClientSession() as session:
        for path, status, reason in calls:
            async with session.get(a.outbound_url + path) as response:
                await response.read()
                assert (path, response.status) == (path, status)
                assert response.headers.get("x-sidecar-reason") == reason, path
                assert response.headers["x-sidecar-attempts"] == "1", path
                assert "x-sidecar-debug" not in response.headers, path
                assert not any(s in v for s in SECRETS for v in response.headers.values())
    await a.stop()
    await b.stop()
    a_records = [json.loads(line) for line in a.audit_path.read_text().splitlines()]
    assert [r["reason"] for r in a_records] == [reason for _, _, reason in calls]
    b_records = [json.loads(line) for line in b.audit_path.read_text().splitlines()]
    assert [r["reason"] for r in b_records] == [None, "policy_denied"]
    for process in (a, b):
        text = process.audit_path.read_text() + process.logs(chars=10**6)
        assert not any(s in text for s in SECRETS), process.name
