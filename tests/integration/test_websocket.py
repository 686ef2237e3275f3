"""WebSocket upgrades pass through both sidecars after identity and policy checks."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest
from aiohttp import web

from sidecar.http import websocket

pytestmark = pytest.mark.timeout(60)


async def test_websocket_relays_frames_after_identity_and_policy(make_mesh, upstreams):
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams().start()
    callers: list[str | None] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        callers.append(request.headers.get("x-source-service"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app_b.script = echo
    b = mesh.sidecar("b", inbound={"app": app_b.url,
                                   "policy": [{"from": ["a"], "paths": ["/ws"]}]})
    await b.start()
    a = mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(a.outbound_url.replace("http", "ws") + "/b/ws") as ws:
            assert ws._response.headers["x-sidecar-attempts"] == "1"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "echo:hello"
            await ws.send_bytes(b"\x01\x02\x03")
            assert (await ws.receive(timeout=10)).data == b"\x03\x02\x01"
        # The policy still applies to upgrades.
        with pytest.raises(aiohttp.WSServerHandshakeError) as denied:
            await session.ws_connect(a.outbound_url.replace("http", "ws") + "/b/other")
        assert denied.value.status == 403
        assert denied.value.headers is not None
        assert denied.value.headers["x-sidecar-reason"] == "policy_denied"
        assert denied.value.headers["x-sidecar-attempts"] == "1"
        # And so does the token check, straight at b's inbound port.
        with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
            await session.ws_connect(b.inbound_url.replace("http", "ws") + "/ws")
        assert missing.value.status == 401
    assert callers == ["a"]


LIMIT = 64 * 1024  # limits.max_request_body here: the most one message may hold


async def closed_with(closes: list[int | None], count: int) -> int | None:
    """The code the app's `count`-th socket was closed with, once it is closed."""
    async with asyncio.timeout(10):
        while len(closes) < count:
            await asyncio.sleep(0.02)
    return closes[count - 1]


async def test_a_message_over_the_body_limit_closes_with_1009_either_way(make_mesh, upstreams):
    """A message is relayed once whole, so each is held in memory: one over
    limits.max_request_body closes the socket with 1009 rather than buffering
    without end, in either direction, and the sidecars serve on."""
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams().start()
    closes: list[int | None] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT and message.data.startswith("send "):
                await ws.send_bytes(b"x" * int(message.data.split()[1]))
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_str(f"got {len(message.data)}")
        closes.append(ws.close_code)
        return ws

    app_b.script = echo
    limits = {"max_request_body": LIMIT}
    b = mesh.sidecar("b", limits=limits,
                     inbound={"app": app_b.url, "policy": [{"from": ["a"], "paths": ["/ws"]}]})
    await b.start()
    a = mesh.sidecar("a", limits=limits, services={
        "b": {"endpoints": [b.inbound_url]},
        # Outside the mesh: straight to the app, whose socket takes any size.
        "direct": {"endpoints": [app_b.url], "mesh": False}})
    await a.start()
    url = a.outbound_url.replace("http", "ws") + "/b/ws"
    async with aiohttp.ClientSession() as session:
        # Up to the limit, both ways.
        async with session.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_bytes(b"y" * LIMIT)
            assert (await ws.receive(timeout=10)).data == f"got {LIMIT}"
            await ws.send_str(f"send {LIMIT}")
            assert len((await ws.receive(timeout=10)).data) == LIMIT
        assert await closed_with(closes, 1) == aiohttp.WSCloseCode.OK
        # One byte over, from the client: the relay closes with 1009.
        async with session.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_bytes(b"y" * (LIMIT + 1))
            answer = await ws.receive(timeout=10)
            assert answer.type == aiohttp.WSMsgType.CLOSE, answer
            assert answer.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # ... and so is the app.
        assert await closed_with(closes, 2) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # One byte over, from the app: the client is told 1009 as well.
        async with session.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(f"send {LIMIT + 1}")
            answer = await ws.receive(timeout=10)
            assert answer.type == aiohttp.WSMsgType.CLOSE, answer
            assert answer.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert await closed_with(closes, 3) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # Compressed, a message is bounded once inflated: one byte over is 1009 too, at
        # the first sidecar (in the mesh the next would refuse it as well).
        direct = a.outbound_url.replace("http", "ws") + "/direct/ws"
        async with session.ws_connect(direct, max_msg_size=0, compress=15) as ws:
            await ws.send_bytes(b"y" * (LIMIT + 1))
            answer = await ws.receive(timeout=10)
            assert answer.type == aiohttp.WSMsgType.CLOSE, answer
            assert answer.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert await closed_with(closes, 4) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # Text is measured in UTF-8 bytes, not characters.
        async with session.ws_connect(direct, max_msg_size=0, compress=15) as ws:
            await ws.send_str("é" * (LIMIT // 2) + "a")
            answer = await ws.receive(timeout=10)
            assert answer.type == aiohttp.WSMsgType.CLOSE, answer
            assert answer.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert await closed_with(closes, 5) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # And the path still serves.
        async with session.ws_connect(url) as ws:
            await ws.send_bytes(b"z")
            assert (await ws.receive(timeout=10)).data == "got 1"


@pytest.mark.parametrize(("code", "sent"), [
    (None, 1000), (1005, 1000), (1006, 1001), (1015, 1011), (999, 1011), (1004, 1011),
    (2999, 1011), (5000, 1011), (1000, 1000), (1009, 1009), (1014, 1014), (3000, 3000),
    (4999, 4999),
])
def test_only_codes_a_close_frame_may_carry_are_passed_on(code: int | None, sent: int) -> None:
    """RFC 6455 7.4: 1005, 1006 and 1015 say what happened and are never sent."""
    assert websocket.sendable(code) == sent


async def test_a_side_that_stops_reading_is_cut_after_the_idle_timeout(make_mesh, upstreams):
    """A quiet socket may stay open, but one that takes nothing while the other side
    sends (it stopped reading) is cut after limits.idle_timeout, as a relayed body
    that stops is: the relay would otherwise hold its connection, and a message,
    for ever. The other side is closed with 1001 and the sidecar serves on."""
    mesh = make_mesh(["a"])
    app = await upstreams().start()
    ended: list[int | None] = []

    async def flood(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if request.path.endswith("/flood"):
            try:
                for _ in range(200):  # 12.5 MiB at most, far past the client's buffers
                    await ws.send_bytes(b"f" * 65536)
                await ws.receive(timeout=30)
            except (ConnectionError, TimeoutError):
                pass
        else:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str("echo:" + message.data)
        ended.append(ws.close_code)
        return ws

    app.script = flood
    a = await mesh.sidecar("a", limits={"idle_timeout": "2s"}, services={
        "app": {"endpoints": [app.url], "mesh": False}}).start()
    host, port = a.outbound_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    # Whatever the client does not read piles up in a small receive buffer.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"GET /app/flood HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        # ... and is never read: the app's socket is closed by the relay all the same.
        async with asyncio.timeout(30):
            while not ended:
                await asyncio.sleep(0.05)
        # Told 1001 when the app takes the relay's close frame within the idle time,
        # which it does once the relay has read what the app was still sending;
        # cut (1006) when it does not.
        assert ended[0] in (aiohttp.WSCloseCode.GOING_AWAY,
                            aiohttp.WSCloseCode.ABNORMAL_CLOSURE), ended
        # The client's connection was cut (a reset): what it reads ends soon after.
        async with asyncio.timeout(30):
            with contextlib.suppress(ConnectionResetError):
                while await reader.read(1 << 20):
                    pass
    finally:
        writer.close()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(a.outbound_url.replace("http", "ws") + "/app/echo") as ws:
            await ws.send_str("still here")
            assert (await ws.receive(timeout=10)).data == "echo:still here"
