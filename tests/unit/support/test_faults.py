"""The fault proxy itself, driven with a real aiohttp upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from sidecar.clock import FakeClock
from tests.support.faults import FaultProxy, ResponseFramer, cut_point
from tests.support.upstream import Script, Upstream

REQUEST = b"GET /thing HTTP/1.1\r\nHost: upstream\r\n\r\n"
BOUND = 2.0  # an upper bound on waits that should end at once, not a timing assertion


@pytest.fixture
async def upstream(upstreams: Callable[..., Upstream]) -> Upstream:
    return await upstreams().start()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(upstream.port).start()
    proxy.clock = FakeClock()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length framed response: its head and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def read_until_reset(reader: asyncio.StreamReader) -> bytes:
    received = b""
    with pytest.raises(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), BOUND):
            received += chunk
    return received


def script_body(body: bytes) -> Script:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/octet-stream")

    return answer


# -- pure framing -------------------------------------------------------------


def test_cut_point_is_end_of_headers_plus_ten_body_bytes() -> None:
    assert cut_point(b"HTTP/1.1 200 OK\r\nContent-Le", None) is None
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
    assert cut_point(head + b"abc", None) == len(head) + 10
    assert cut_point(b"", 7) == 7


def test_framer_counts_a_content_length_response_fed_byte_by_byte() -> None:
    framer = ResponseFramer()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    for i in range(len(response) - 1):
        framer.feed(response[i : i + 1])
        assert framer.completed == 0
        assert not framer.between_responses
    framer.feed(response[-1:])
    assert framer.completed == 1
    assert framer.between_responses


def test_framer_follows_chunked_bodies_with_extensions_and_trailers() -> None:
    framer = ResponseFramer()
    framer.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
    framer.feed(b"3\r\nabc\r\n0\r\nX-Trailer: yes\r\n")
    assert framer.completed == 0
    framer.feed(b"\r\n")
    assert framer.completed == 1
    assert framer.between_responses


def test_framer_knows_bodiless_and_interim_responses() -> None:
    framer = ResponseFramer()
    framer.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert framer.completed == 0
    framer.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    framer.feed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n")
    assert framer.completed == 3


def test_framer_never_ends_a_response_framed_by_close() -> None:
    framer = ResponseFramer()
    framer.feed(b"HTTP/1.1 200 OK\r\n\r\nsome body")
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # just more body
    assert framer.completed == 0
    assert not framer.between_responses


# -- modes --------------------------------------------------------------------


async def test_pass_relays_request_and_response(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    body = b"x" * 300_000  # several chunks each way
    async with session.post(f"{proxy.url}/claims?id=7", data=body) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["path"] == "/claims?id=7"
    assert echoed["body_length"] == len(body)
    assert upstream.seen[0].body == body
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    assert (proxy.connections, proxy.requests_forwarded) == (1, 1)
    assert isinstance(proxy.clock, FakeClock)
    assert proxy.clock.sleeps == []


async def test_latency_delays_each_response_chunk(
    proxy: FaultProxy, session: aiohttp.ClientSession
) -> None:
    assert isinstance(proxy.clock, FakeClock)
    proxy.mode = "latency"
    proxy.latency = 0.25
    async with session.get(f"{proxy.url}/slow") as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == "/slow"
    assert proxy.clock.sleeps
    assert set(proxy.clock.sleeps) == {0.25}


async def test_blackhole_takes_the_request_and_never_answers(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.mode = "blackhole"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)
    assert not reader.at_eof()
    assert upstream.seen == []
    assert (proxy.connections, proxy.requests_forwarded) == (1, 0)
    writer.close()


async def test_refuse_closes_the_port_and_pass_reopens_the_same_one(
    proxy: FaultProxy, session: aiohttp.ClientSession
) -> None:
    port = proxy.port
    await proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await proxy.set_mode("pass")
    assert proxy.port == port
    async with session.get(f"http://127.0.0.1:{port}/back") as resp:
        assert (await resp.json())["path"] == "/back"


async def test_refuse_needs_set_mode(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="set_mode"):
        proxy.mode = "refuse"
    with pytest.raises(ValueError, match="mode must be one of"):
        proxy.mode = "flaky"
    assert proxy.mode == "pass"


async def test_reset_before_response_resets_and_forwards_nothing(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy.mode = "reset_before_response"
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await session.get(f"{proxy.url}/claims")
    tried = proxy.connections  # aiohttp may retry a GET once on a fresh connection
    assert tried >= 1

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    assert await read_until_reset(reader) == b""
    writer.close()
    assert upstream.seen == []
    assert (proxy.connections, proxy.requests_forwarded) == (tried + 1, 0)


async def test_reset_mid_body_gives_the_status_then_breaks_the_body(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.script = script_body(b"b" * 1000)
    proxy.mode = "reset_mid_body"
    async with session.get(f"{proxy.url}/report") as resp:
        assert resp.status == 200
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await resp.read()
    assert upstream.paths() == ["/report"]
    assert proxy.requests_forwarded == 1


async def test_reset_mid_body_cuts_ten_bytes_after_the_headers(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    upstream.script = script_body(b"0123456789abcdefghij" * 50)
    proxy.mode = "reset_mid_body"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    received = await read_until_reset(reader)
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"0123456789"


async def test_reset_mid_body_honours_cut_after(proxy: FaultProxy, upstream: Upstream) -> None:
    upstream.script = script_body(b"z" * 1000)
    proxy.mode = "reset_mid_body"
    proxy.cut_after = 12
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    assert await read_until_reset(reader) == b"HTTP/1.1 200"
    writer.close()


async def test_close_idle_closes_a_connection_quiet_after_its_response(
    proxy: FaultProxy,
) -> None:
    assert isinstance(proxy.clock, FakeClock)
    proxy.mode = "close_idle"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert b'"path": "/thing"' in body
    assert await asyncio.wait_for(reader.read(), BOUND) == b""
    assert proxy.clock.sleeps == [pytest.approx(proxy.idle_close)]
    writer.close()


async def test_close_idle_waits_for_the_response_to_finish(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    assert isinstance(proxy.clock, FakeClock)
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first part")
        await release.wait()
        await resp.write(b"second part")
        await resp.write_eof()
        return resp

    upstream.script = stalls
    proxy.mode = "close_idle"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    received = await reader.readuntil(b"first part")
    assert received.startswith(b"HTTP/1.1 200")
    await settle()
    assert proxy.clock.sleeps == []  # mid-response is not idle
    release.set()
    received = await asyncio.wait_for(reader.read(), BOUND)  # the rest, then EOF
    assert b"second part" in received
    assert received.endswith(b"0\r\n\r\n")
    assert proxy.clock.sleeps == [pytest.approx(proxy.idle_close)]
    writer.close()


async def test_stop_closes_held_connections_and_the_port(proxy: FaultProxy) -> None:
    proxy.mode = "blackhole"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    await writer.drain()
    await settle()
    await proxy.stop()
    try:
        assert await asyncio.wait_for(reader.read(), BOUND) == b""
    except ConnectionResetError:
        pass  # a reset closes it just as well
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_an_absent_upstream_closes_the_client(upstream: Upstream) -> None:
    proxy = await FaultProxy(upstream.port).start()
    await upstream.stop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(REQUEST)
        assert await asyncio.wait_for(reader.read(), BOUND) == b""
        assert (proxy.connections, proxy.requests_forwarded) == (1, 0)
        writer.close()
    finally:
        await proxy.stop()
