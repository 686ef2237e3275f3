"""The sidecar adds no header of its own to an answer: relayed ones keep exactly the
upstream's headers, its own name no software (issue 9, defect 7).

Through both listeners at once: client -> a (outbound) -> b (inbound) -> a
hand-made app, so each answer crosses both sidecars' edges.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.support.raw import exchange

pytestmark = pytest.mark.timeout(90)

# What the app sends: no Content-Type, no Server, no Date.
ANSWERS = {
    "/plain": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "/none": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/same": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
}
# Framing, the hop's own connection handling, RFC 9110 6.6.1's Date, and SPEC's attempts.
EVERY_METHOD = [{"from": ["a"], "paths": ["/claims/*"]}]
ALLOWED = {"content-length", "transfer-encoding", "connection", "date", "x-sidecar-attempts"}


def app_answer(method: str, path: str) -> bytes:
    answer = ANSWERS[path.removeprefix("/claims")]
    return answer[:-5] if method == "HEAD" else answer


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


async def test_relayed_answers_carry_only_what_the_app_sent(make_mesh, canned):
    app = await canned(app_answer).start()
    mesh = make_mesh(["a", "b"])
    b = await mesh.sidecar("b", inbound={"app": app.url, "policy": EVERY_METHOD}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
    for method, path in [("GET", "/plain"), ("HEAD", "/plain"), ("GET", "/chunked"),
                         ("GET", "/none"), ("GET", "/same")]:
        reply = await exchange(a.outbound, get(f"/b/claims{path}", method))
        assert reply.status in (200, 204, 304), reply.data[:300]
        assert reply.header_names() - {"etag"} <= ALLOWED, (method, path, reply.data[:300])
    assert app.paths == ["/claims/plain", "/claims/plain", "/claims/chunked",
                         "/claims/none", "/claims/same"]


async def test_the_sidecars_own_answers_name_no_software(make_mesh, canned):
    app = await canned(app_answer).start()
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", inbound={"app": app.url}).start()
    answers = [
        await exchange(a.outbound, get("/nowhere/x")),  # 404 no_route
        await exchange(a.inbound, get("/claims")),  # 401 token_missing
        await exchange(a.outbound, b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),  # 400
        await exchange(a.inbound, b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-A: b\r\n c\r\n\r\n"),
    ]
    assert [reply.status for reply in answers] == [404, 401, 400, 400]
    for reply in answers:
        assert "server" not in reply.header_names()
        assert reply.header("Content-Type") == "application/problem+json"
    assert app.heads == []


async def test_an_accepted_websocket_names_no_software(make_mesh, upstreams):
    async def accept(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = await upstreams(script=accept).start()
    mesh = make_mesh(["a", "b"])
    b = await mesh.sidecar("b", inbound={"app": app.url, "policy": EVERY_METHOD}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
    reply = await exchange(a.outbound, b"GET /b/claims/ws HTTP/1.1\r\nHost: localhost\r\n"
                           b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", within=3)
    assert reply.status == 101
    assert "server" not in reply.header_names()


async def test_the_admin_port_names_no_software_either(make_mesh):
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a").start()
    for path in ("/healthz", "/metrics", "/admin/services", "/readyz/outbound"):
        answer = await exchange(a.admin, get(path))
        assert answer.status == 200, path
        assert "server" not in answer.header_names(), path
