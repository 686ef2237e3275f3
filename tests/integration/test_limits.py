"""The limits against a real sidecar (issue 9, corpus 4): header line and count, body
size, slow headers, stalled bodies, idle connections, compressed bodies, and a slow
reader of a large answer."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.integration.resilience_support import wait_until
from tests.integration.test_core import wait_for_audit
from tests.support.raw import exchange, header_of
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


async def through_one_sidecar(make_mesh, app_url: str, **limits: object):
    """A sidecar whose outbound (`/payer`) and inbound (public) listeners lead to one app."""
    mesh = make_mesh(["a"])
    return await mesh.sidecar(
        "a", inbound={"app": app_url, "public_paths": ["/*"]},
        services={"payer": {"endpoints": [app_url], "mesh": False, "timeout": "60s"}},
        limits=limits).start()


def listeners(a) -> list[tuple[int, bytes]]:
    return [(a.outbound, b"/payer"), (a.inbound, b"")]


async def test_header_and_body_limits_on_both_listeners(make_mesh, upstreams):
    app = await upstreams().start()
    a = await through_one_sidecar(make_mesh, app.url, max_header_line="1KiB", max_headers=20,
                                  max_request_body="1KiB")
    many = b"".join(b"x-h%d: 1\r\n" % i for i in range(40))
    for port, prefix in listeners(a):
        get = b"GET " + prefix + b"/x HTTP/1.1\r\nHost: localhost\r\n"
        post = b"POST " + prefix + b"/x HTTP/1.1\r\nHost: localhost\r\n"
        for vector in (get + b"x-big: " + b"v" * 1100 + b"\r\n\r\n", get + many + b"\r\n"):
            reply = await exchange(port, vector)
            assert reply.status == 431 and reply.closed
            assert reply.header("x-sidecar-reason") == "headers_too_large"
        # 413 on the length alone: the client has sent ten bytes of its 50 MiB.
        reply = await exchange(port, post + b"Content-Length: 52428800\r\n\r\n0123456789",
                               within=3)
        assert reply.status == 413 and reply.header("x-sidecar-reason") == "body_too_large"
        # A chunked body is refused once it passes the limit.
        chunks = b"200\r\n" + b"y" * 512 + b"\r\n"
        reply = await exchange(port, post + b"Transfer-Encoding: chunked\r\n\r\n" + chunks * 4,
                               within=3)
        assert reply.status == 413
    assert app.seen == []


async def test_slowloris_connections_do_not_hold_up_a_normal_call(make_mesh, upstreams):
    app = await upstreams().start()
    a = await through_one_sidecar(make_mesh, app.url, header_timeout="6s")
    cut: list[bool] = []

    async def slowloris(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /payer/x HTTP/1.1\r\nHost: localhost\r\nx-slow: ")
        try:
            for _ in range(100):  # a byte every 0.2 s; the sidecar cuts it off first
                writer.write(b"z")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                        cut.append(True)
                        return
                except TimeoutError:
                    pass
        except ConnectionError:
            cut.append(True)
        finally:
            writer.close()

    slow = [asyncio.ensure_future(slowloris(port)) for port, _ in listeners(a) * 50]
    await asyncio.sleep(0.5)  # let them all connect and start trickling
    for port, prefix in listeners(a):
        reply = await exchange(port, b"GET " + prefix + b"/x HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Connection: close\r\n\r\n")
        assert reply.status == 200
    assert cut == []  # the normal calls were answered while all hundred hung
    await asyncio.gather(*slow)
    assert len(cut) == 100  # and each was cut off at its header_timeout
    assert app.paths() == ["/x", "/x"]


async def test_an_idle_keep_alive_connection_is_closed(make_mesh, upstreams):
    app = await upstreams().start()
    a = await through_one_sidecar(make_mesh, app.url, idle_timeout="1s")
    for port, prefix in listeners(a):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET " + prefix + b"/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(header_of(head, "Content-Length") or 0))
        # Kept alive for the next request, until it has been idle for idle_timeout.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


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


def rss(process) -> int:
    """Resident memory of `process` in bytes, from /proc."""
    assert process.proc is not None
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


async def test_a_slow_reader_of_a_large_answer_does_not_grow_memory(make_mesh, upstreams):
    size, piece = 50 * 1024 * 1024, 64 * 1024

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        block = b"m" * piece
        for _ in range(size // piece):
            await response.write(block)
        return response

    app = await upstreams(script=large).start()
    mesh = make_mesh(["a", "b"])
    b = await mesh.sidecar("b", inbound={"app": app.url}, defaults={"timeout": "90s"}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url],
                                                "timeout": "90s"}}).start()
    before = {sidecar: rss(sidecar) for sidecar in (a, b)}
    peak = dict(before)
    read = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/large") as response:
            async for chunk in response.content.iter_chunked(piece):
                read += len(chunk)
                if read % (2 * 1024 * 1024) < len(chunk):
                    for sidecar in peak:
                        peak[sidecar] = max(peak[sidecar], rss(sidecar))
                await asyncio.sleep(0.005)  # far slower than the app sends
    assert read == size
    for sidecar in (a, b):
        # Generous, and far below the 50 MiB answer: what is held is a window, not the body.
        assert peak[sidecar] - before[sidecar] < 20 * 1024 * 1024, sidecar.name
