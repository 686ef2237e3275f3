"""WebSocket upgrades pass through both sidecars after identity and policy checks."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

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
