"""`transport.exchange` over the lean client: what it sends, and how each failure maps
onto `UpstreamError` for `classify`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from sidecar.http import transport
from sidecar.stack import Body, BodyTooLarge, Call, Reply, UpstreamError
from tests.support.calls import make_call, target
from tests.support.scripted import OK, Scripted, Step

WITHIN = 5.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    made = transport.new_session()
    yield made
    await made.close()


async def exchange(session: aiohttp.ClientSession, call: Call, url: str) -> Reply:
    async with asyncio.timeout(WITHIN):
        return await transport.exchange(session, call, url, connect_timeout=1.0)


async def read(reply: Reply) -> bytes:
    if isinstance(reply.body, bytes):
        return reply.body
    async with asyncio.timeout(WITHIN):
        return b"".join([chunk async for chunk in reply.body])


async def eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WITHIN):
        while not check():
            await asyncio.sleep(0.01)


async def test_host_is_the_endpoints_and_nothing_is_added(session: aiohttp.ClientSession):
    call = make_call("/claims/7", host="evil.example", query="a=1",
                     headers={"Authorization": "Bearer x"}, to=target("payer"))
    async with Scripted([Step(OK)]) as upstream:
        reply = await exchange(session, call, upstream.url)
        assert (reply.status, await read(reply)) == (200, b"ok")
    port = upstream.url.rsplit(":", 1)[1]
    assert upstream.requests[0][1] == (
        f"GET /claims/7?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Authorization: Bearer x\r\n\r\n").encode()
    assert call.headers["Host"] == "evil.example"  # the call itself is left as it was


async def test_a_reset_on_a_kept_alive_connection_is_reset_sent_and_not_resent(
        session: aiohttp.ClientSession):
    async with Scripted([Step(OK), Step(None, close=True)]) as upstream:
        await read(await exchange(session, make_call("/a", to=target("payer")), upstream.url))
        with pytest.raises(UpstreamError) as caught:
            await exchange(session, make_call("/b", to=target("payer")), upstream.url)
    assert (caught.value.kind, caught.value.sent) == ("reset", True)
    assert len(upstream.requests) == 2


async def test_a_malformed_answer_is_bad_response(session: aiohttp.ClientSession):
    async with Scripted([Step(b"NOT HTTP\r\n\r\n")]) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await exchange(session, make_call("/a", to=target("payer")), upstream.url)
    assert (caught.value.kind, caught.value.sent) == ("bad-response", True)


async def test_a_refused_connection_is_a_connect_failure_with_nothing_sent(
        session: aiohttp.ClientSession):
    async with Scripted([]) as upstream:
        url = upstream.url
    with pytest.raises(UpstreamError) as caught:
        await exchange(session, make_call("/a", to=target("payer")), url)
    assert (caught.value.kind, caught.value.sent) == ("connect-failure", False)


async def test_the_bodys_own_error_surfaces_as_itself(session: aiohttp.ClientSession):
    async def too_large() -> AsyncIterator[bytes]:
        yield b"a" * 10
        raise BodyTooLarge

    call = make_call("/a", method="POST", body=Body(stream=too_large()), to=target("payer"))
    async with Scripted([Step(None)]) as upstream:
        with pytest.raises(BodyTooLarge):
            await exchange(session, call, upstream.url)


async def test_a_break_mid_body_is_a_connection_reset_from_the_body(
        session: aiohttp.ClientSession):
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\npart"
    async with Scripted([Step(cut, close=True)]) as upstream:
        reply = await exchange(session, make_call("/a", to=target("payer")), upstream.url)
        with pytest.raises(ConnectionResetError):
            await read(reply)


async def test_closing_the_session_closes_the_lean_pools_connections():
    session = transport.new_session()
    async with Scripted([Step(OK)]) as upstream:
        reply = await exchange(session, make_call("/a", to=target("payer")), upstream.url)
        await read(reply)
        reply.discard()
        assert transport.lean_pool(session).idle_count() == 1
        await session.close()
        await eventually(lambda: upstream.closed_by_client == 1)


async def test_a_small_body_that_came_with_its_head_is_relayed_whole_and_its_connection_freed(
        session: aiohttp.ClientSession):
    async with Scripted([Step(OK)]) as upstream:
        reply = await exchange(session, make_call("/a", to=target("payer")), upstream.url)
        assert reply.body == b"ok"
        # Back in the pool before anyone reads: nothing of it is left on the wire.
        assert transport.lean_pool(session).idle_count() == 1


@pytest.mark.parametrize(("method", "answer"), [
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npa"),  # not all here yet
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000),  # too big
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n"),  # its length is not a body's
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1024\r\n\r\n"),
])
async def test_other_bodies_stream(session: aiohttp.ClientSession, method: str, answer: bytes):
    async with Scripted([Step(answer, close=True)]) as upstream:
        reply = await exchange(session, make_call("/a", method=method, to=target("payer")),
                               upstream.url)
        assert not isinstance(reply.body, bytes)
        reply.discard()
