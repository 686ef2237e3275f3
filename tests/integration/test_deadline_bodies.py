"""Deadlines bound the answer's body too (issue 9, defect 8): once a call's time has
passed mid-body the connection is aborted, so a cut answer never looks complete. The
per-try timeout only bounds the wait for an answer to begin."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from sidecar.identity import keys
from sidecar.identity.tokens import Minter
from tests.integration.resilience_support import wait_until

pytestmark = pytest.mark.timeout(90)

CHUNKS = 30  # the app's answer: this many chunks, a tenth of a second apart


async def trickle(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(CHUNKS):
        await response.write(b"." * 100)
        await asyncio.sleep(0.1)
    await response.write_eof()
    return response


async def test_the_inbound_hold_cuts_the_apps_body_once_the_callers_time_is_up(
    make_mesh, upstreams
):
    app = await upstreams(script=trickle).start()
    mesh = make_mesh(["a", "b"])
    b = await mesh.sidecar("b", inbound={"app": app.url}).start()
    ring = mesh.keyring
    key = keys.load_private_key(ring.private_key("a"), ring.algorithm)
    token = Minter(service="a", algorithm=ring.algorithm, key=key, ttl=60).token_for("b")
    async with aiohttp.ClientSession() as session:
        async with session.get(b.inbound_url + "/claims", headers={
            "x-service-token": token, "x-sidecar-timeout-ms": "300",
        }) as response:
            assert response.status == 200  # begun within the time
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    # The app's connection went with it.
    await wait_until(app.closed_all, "the app's connection to close")


async def test_the_outbound_deadline_cuts_a_body_still_coming(make_mesh, upstreams):
    app = await upstreams(script=trickle).start()
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", services={"payer": {
        "endpoints": [app.url], "mesh": False, "timeout": "500ms"}}).start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/payer/report") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        # The app's own shorter deadline does the same.
        async with session.get(a.outbound_url + "/payer/report",
                               headers={"x-sidecar-timeout-ms": "300"}) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await wait_until(app.closed_all, "the app's connections to close")


async def test_a_body_longer_than_the_per_try_timeout_arrives_whole(make_mesh, upstreams):
    app = await upstreams(script=trickle).start()
    mesh = make_mesh(["a", "b"])
    b = await mesh.sidecar("b", inbound={"app": app.url}).start()
    a = await mesh.sidecar("a", services={"b": {
        "endpoints": [b.inbound_url], "timeout": "20s",
        "retry": {"per_try_timeout": "1s"}}}).start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/report") as response:
            assert response.status == 200
            assert len(await response.read()) == CHUNKS * 100
