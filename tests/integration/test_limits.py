"""The limits against a real sidecar (issue 9, corpus 4): header line and count, body
size, slow headers, stalled bodies, idle connections, compressed bodies, and a slow
reader of a large answer."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import pytest

from tests.integration.resilience_support import wait_until
from tests.integration.test_core import wait_for_audit
from tests.support.raw import exchange
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(120)

STALLED = 20  # uploads per listener that stop after ten of their hundred bytes


async def test_a_stalled_upload_is_cut_with_408_and_its_app_connection_released(
    make_mesh, upstreams
):
    app: Upstream = await upstreams().start()
    mesh = make_mesh(["a"])
    # `streamed` sends a body on as it comes; `buffered` holds it for a retry first.
    a = await mesh.sidecar(
        "a", inbound={"app": app.url, "public_paths": ["/*"]},
        services={"streamed": {"endpoints": [app.url], "mesh": False, "retry": {"attempts": 1}},
                  "buffered": {"endpoints": [app.url], "mesh": False}},
        limits={"idle_timeout": "2s"}).start()
    stalled = (b"POST {p}/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
               b"0123456789")
    uploads = [exchange(port, stalled.replace(b"{p}", prefix))
               for port, prefix in [(a.outbound, b"/streamed"), (a.inbound, b"")] * STALLED]
    uploads.append(exchange(a.outbound, stalled.replace(b"{p}", b"/buffered")))
    running = [asyncio.ensure_future(upload) for upload in uploads]
    # Each streamed upload holds a connection to the app while it lasts...
    async def held() -> bool:
        return app.open_connections() == 2 * STALLED

    await wait_until(held, "the uploads to reach the app")
    replies = await asyncio.gather(*running)
    for reply in replies:
        assert reply.statuses == [408], reply.data[:300]
        assert reply.header("x-sidecar-reason") == "body_stalled"
        assert reply.closed
    # ...and none once it is cut: the app got no whole request.
    assert app.seen == []
    await wait_until(app.closed_all, "the app's connections to close")
    records = await wait_for_audit(a, 2 * STALLED + 1)
    assert {(r["status"], r["reason"], r["decision"]) for r in records} == {
        (408, "body_stalled", "denied")}


async def test_compressed_bodies_pass_both_ways_as_they_are(make_mesh, canned):
    answer = gzip.compress(b"answer " * 200)

    def gzipped(method: str, path: str) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                % len(answer) + answer)

    app = await canned(gzipped).start()
    mesh = make_mesh(["a", "b"])
    b = await mesh.sidecar("b", inbound={"app": app.url}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
    upload = gzip.compress(b"request " * 200)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(a.outbound_url + "/b/x", data=upload, headers={
            "Content-Encoding": "gzip", "Accept-Encoding": "gzip",
        }) as response:
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == answer
    assert app.bodies == [upload]
    assert app.header(0, "Content-Encoding") == "gzip"
    assert app.header(0, "Accept-Encoding") == "gzip"

