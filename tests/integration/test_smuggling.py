"""HTTP parsing and smuggling (issue 9, corpus 2): hostile requests over raw sockets.

Every vector goes to both listeners of one sidecar, the outbound one (to a
`mesh: false` service) and the inbound one (a public path), each leading to
the same counting app; and every test runs twice, with aiohttp's C parser
(llhttp) and with its Python parser (`AIOHTTP_NO_EXTENSIONS=1` in the
sidecar's environment). A vector is either refused (400 `bad_request`, the
connection closed, nothing reaches the app) or served safely (one request at
the app, as SPEC says it should look). The app never receives a request
smuggled behind another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from aiohttp import web

from deploy.process import SidecarProcess
from sidecar.identity import keys
from sidecar.identity.tokens import Minter
from tests.integration.test_core import wait_for_audit
from tests.support.raw import Exchange, exchange
from tests.support.upstream import Seen, Upstream

pytestmark = pytest.mark.timeout(120)

PARSERS = {"llhttp": {}, "python": {"AIOHTTP_NO_EXTENSIONS": "1"}}
HEAD = b"POST {p}/x HTTP/1.1\r\nHost: localhost\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n"
SMUGGLED = b"GET {p}/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass
class Front:
    """One sidecar whose two listeners lead to one app, and the parser it runs."""

    sidecar: SidecarProcess
    app: Upstream
    parser: str

    async def send(self, vector: bytes) -> list[Exchange]:
        """`vector` to each listener, `{p}` standing for the path prefix that routes it."""
        replies = []
        for port, prefix in ((self.sidecar.outbound, b"/payer"), (self.sidecar.inbound, b"")):
            replies.append(await exchange(port, vector.replace(b"{p}", prefix)))
        return replies

    async def refused(self, vector: bytes) -> None:
        """400 bad_request and a closed connection on both listeners; the app saw nothing."""
        for reply in await self.send(vector):
            assert reply.statuses == [400], reply.data[:400]
            assert reply.header("x-sidecar-reason") == "bad_request"
            assert reply.closed
        assert self.app.seen == []

    async def served(self, vector: bytes, body: bytes = b"abc") -> list[Seen]:
        """One answer on each listener, and the app got the one request with `body`."""
        for reply in await self.send(vector):
            assert reply.statuses == [200], reply.data[:400]
        seen, self.app.seen = self.app.seen, []
        assert [(one.path, one.body) for one in seen] == [("/x", body)] * 2
        return seen


@pytest.fixture(params=list(PARSERS))
async def front(request, make_mesh, upstreams) -> Front:
    app = await upstreams().start()
    mesh = make_mesh(["a"])
    sidecar = mesh.sidecar(
        "a", inbound={"app": app.url, "public_paths": ["/*"]},
        services={"payer": {"endpoints": [app.url], "mesh": False, "retry": {"attempts": 1}}},
        limits={"idle_timeout": "1s"})
    sidecar.env.update(PARSERS[request.param])
    await sidecar.start()
    # The sidecar checks which parser it runs and says so when it starts.
    assert started_with(sidecar)["http_parser"] == request.param
    return Front(sidecar, app, request.param)


def started_with(sidecar: SidecarProcess) -> dict[str, object]:
    """The sidecar's start-up log line."""
    for line in sidecar.stdout_path.read_text().splitlines():
        record = json.loads(line)
        if record["msg"] == "sidecar started":
            return record
    raise AssertionError("no start-up log line")


async def test_ambiguous_or_malformed_lengths_are_refused(front):
    for vector in [
        HEAD + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        CHUNKED + b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        HEAD + b"Content-Length: 3\r\nContent-Length: 40\r\n\r\nabc" + SMUGGLED,
        HEAD + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        HEAD + b"Content-Length: 3, 3\r\n\r\nabc",
        *(HEAD + b"Content-Length: " + value + b"\r\n\r\nabc" for value in [
            b"+3", b"-3", b"0x3", b"1_0", "\u0663".encode(), b"1 0", b"",
            b"99999999999999999999999999",  # past 2^64
        ]),
    ]:
        await front.refused(vector)


async def test_transfer_codings_other_than_plain_chunked_are_refused(front):
    body = b"3\r\nabc\r\n0\r\n\r\n"
    for header in [
        b"Transfer-Encoding: xchunked", b"Transfer-Encoding : chunked",
        b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding: identity",
        b"Transfer-Encoding: gzip, chunked", b'Transfer-Encoding: "chunked"',
        b"Transfer-Encoding:\x0bchunked",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    ]:
        await front.refused(HEAD + header + b"\r\n\r\n" + body)
    # HTTP/1.0 has no chunked coding: its framing is faulty (RFC 9112 6.1).
    await front.refused(b"POST {p}/x HTTP/1.0\r\nHost: localhost\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + body)
    # Header names are case-insensitive and whitespace around a value is not part of it.
    close = b"Connection: close\r\n"
    await front.served(HEAD + close + b"Transfer-Encoding: CHUNKED\r\n\r\n" + body)
    await front.served(HEAD + close + b"Transfer-Encoding:\tchunked \r\n\r\n" + body)


async def test_obs_fold_and_bare_control_characters_are_refused(front):
    for vector in [
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX-A: b\r\n c\r\n\r\n",
        HEAD + b"X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        b"GET {p}/x HTTP/1.1\nHost: localhost\n\n",
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\nX-B: b\r\n\r\n",
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\rX-B: b\r\n\r\n",
        b"GET {p}/x\rHTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX\x00A: b\r\n\r\n",
        b"GET {p}/x\x00y HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX A: b\r\n\r\n",
        b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\x7fb\r\n\r\n",
    ]:
        await front.refused(vector)


async def test_chunk_size_and_extension_abuse_is_refused(front):
    for chunks in [
        b"0x3\r\nabc\r\n0\r\n\r\n", b"+3\r\nabc\r\n0\r\n\r\n", b"-3\r\nabc\r\n0\r\n\r\n",
        b"3 \r\nabc\r\n0\r\n\r\n", b"3;a\nb\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\n0\n\n", b"3\r\nabcXX0\r\n\r\n",
        # Shorter than announced: the rest is not a request of its own.
        b"5\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    ]:
        await front.refused(CHUNKED + b"\r\n" + chunks)
    # Extensions are framing: read, never relayed. Leading zeros are still a size.
    close = b"Connection: close\r\n"
    for chunks in [b"3;name=value\r\nabc\r\n0\r\n\r\n", b'3;a="b c"\r\nabc\r\n0\r\n\r\n',
                   b"3;" + b"e" * 4000 + b"\r\nabc\r\n0\r\n\r\n",
                   b"0" * 1000 + b"3\r\nabc\r\n0\r\n\r\n"]:
        await front.served(CHUNKED + close + b"\r\n" + chunks)


async def test_only_http_1_0_and_1_1_are_spoken(front):
    for request_line in [b"GET {p}/x HTTP/2.0", b"GET {p}/x", b"GET {p}/x HTTP/1.2",
                         b"GET {p}/x HTTP/3.0", b"GET {p}/x HTTP/1", b"GET {p}/x http/1.1",
                         b"GET {p}/x HTTP/01.1"]:
        await front.refused(request_line + b"\r\nHost: localhost\r\n\r\n")
    # The HTTP/2 connection preface, as a prior-knowledge h2 client sends it.
    await front.refused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    # Refused while parsing, and audited as such: nothing of the request is trusted.
    records = await wait_for_audit(front.sidecar, 2 * 8)
    assert {(r["direction"], r["method"], r["route"], r["status"], r["reason"], r["decision"])
            for r in records} == {
        (direction, "OTHER", "/{invalid}", 400, "bad_request", "denied")
        for direction in ("outbound", "inbound")}


async def test_a_second_or_missing_host_is_refused(front):
    await front.refused(b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nHost: payer\r\n\r\n")
    await front.refused(b"GET {p}/x HTTP/1.1\r\nConnection: close\r\n\r\n")


async def test_an_absolute_target_wins_over_host_and_host_never_travels(front):
    for port in (front.sidecar.outbound, front.sidecar.inbound):
        reply = await exchange(port, b"GET http://payer/x HTTP/1.1\r\nHost: evil\r\n"
                                     b"Connection: close\r\n\r\n")
        assert reply.statuses == [200]
    # Outbound the absolute form named the service; inbound only its path counts.
    assert [seen.path for seen in front.app.seen] == ["/x", "/x"]
    assert {seen.headers["host"] for seen in front.app.seen} == {
        f"127.0.0.1:{front.app.port}"}


async def test_nothing_after_a_refused_upgrade_is_read(front):
    async def no_websockets(request: web.Request) -> web.StreamResponse:
        return web.json_response({"websocket": False}, status=404)

    front.app.script = no_websockets
    websocket = (b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    h2c = (b"GET {p}/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
           b"Connection: Upgrade, HTTP2-Settings\r\n\r\n")
    for vector in (websocket, h2c):
        for reply in await front.send(vector + SMUGGLED):
            assert reply.statuses == [404] and reply.closed, reply.data[:400]
    assert front.app.paths() == ["/x"] * 4
    # h2c is never forwarded: its headers are hop-by-hop.
    for seen in front.app.seen[2:]:
        assert not {"upgrade", "http2-settings"} & set(seen.headers)


async def test_trailers_never_travel_and_framing_in_them_is_refused(front):
    """Trailers that name framing or routing headers: llhttp refuses them. The
    Python parser reads and drops every trailer (RFC 9110 6.5.1 lets it), so
    there the request is served without them and what follows is a request
    of its own, checked like any other."""
    close = b"Connection: close\r\n"
    seen = await front.served(CHUNKED + close + b"\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")
    assert not any("x-sum" in one.headers for one in seen)
    for trailer in (b"Content-Length: 50", b"Transfer-Encoding: chunked", b"Host: evil"):
        chunks = b"\r\n3\r\nabc\r\n0\r\n" + trailer + b"\r\n\r\n"
        if front.parser == "llhttp":
            await front.refused(CHUNKED + chunks + SMUGGLED)
        else:
            await front.served(CHUNKED + close + chunks)


async def test_where_the_parsers_differ_on_chunks_nothing_unframed_is_relayed(front):
    """llhttp refuses a CR in a chunk extension and a chunk size past 2^64; the
    Python parser drops the one and waits for the other, as it waits for any
    chunk that never comes (408 `body_stalled`). It refuses an extension longer
    than a header line, which llhttp skips unread. Either way the app gets
    only bodies the sidecar framed itself, and nothing behind them."""
    close = b"Connection: close\r\n"
    cr_in_extension = b"3;a\rb\r\nabc\r\n0\r\n\r\n"
    long_extension = b"3;" + b"e" * 100_000 + b"\r\nabc\r\n0\r\n\r\n"
    past_2_64 = b"10000000000000003\r\nabc\r\n0\r\n\r\n"
    if front.parser == "llhttp":
        await front.refused(CHUNKED + b"\r\n" + cr_in_extension)
        await front.refused(CHUNKED + b"\r\n" + past_2_64 + SMUGGLED)
        await front.served(CHUNKED + close + b"\r\n" + long_extension)
    else:
        await front.served(CHUNKED + close + b"\r\n" + cr_in_extension)
        for reply in await front.send(CHUNKED + b"\r\n" + past_2_64 + SMUGGLED):
            assert reply.statuses == [408] and reply.closed
        await front.refused(CHUNKED + b"\r\n" + long_extension)
    # A chunk announced past the body limit waits like any other, whatever the parser.
    for reply in await front.send(CHUNKED + b"\r\nfffffff\r\nabc\r\n0\r\n\r\n" + SMUGGLED):
        assert reply.statuses == [408] and reply.closed
        assert reply.header("x-sidecar-reason") == "body_stalled"
    assert front.app.seen == []


@pytest.fixture(params=list(PARSERS))
async def mesh_front(request, make_mesh, upstreams):
    """a -> b -> app, both sidecars on the same parser."""
    app = await upstreams().start()
    mesh = make_mesh(["a", "b"])
    b = mesh.sidecar("b", inbound={"app": app.url})
    b.env.update(PARSERS[request.param])
    await b.start()
    a = mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}})
    a.env.update(PARSERS[request.param])
    await a.start()
    return mesh, a, b, app


async def test_connection_cannot_strip_or_forge_an_identity(mesh_front):
    mesh, a, b, app = mesh_front
    spoofed = (b"x-source-service: admin\r\nx-service-token: forged\r\n"
               b"x-sidecar-attempts: 9\r\nx-sidecar-reason: policy_denied\r\n")
    reply = await exchange(a.outbound, b"GET /b/claims HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close, x-service-token, x-source-service\r\n"
                           + spoofed + b"\r\n")
    assert reply.statuses == [200]
    seen = app.seen[0].headers
    # a's token still went to b, and b named the caller itself.
    assert seen["x-source-service"] == "a"
    assert "x-service-token" not in seen
    assert not any(name.startswith("x-sidecar-") for name in seen)
    # Straight to b: naming the token hop-by-hop only removes it (no token, no call),
    # and a spoofed caller is replaced by the verified one.
    ring = mesh.keyring
    key = keys.load_private_key(ring.private_key("a"), ring.algorithm)
    token = Minter(service="a", algorithm=ring.algorithm, key=key, ttl=60).token_for("b")
    head = b"GET /claims HTTP/1.1\r\nHost: b\r\nx-service-token: " + token.encode() + b"\r\n"
    reply = await exchange(b.inbound, head + b"Connection: close, x-service-token\r\n\r\n")
    assert reply.statuses == [401]
    assert reply.header("x-sidecar-reason") == "token_missing"
    reply = await exchange(b.inbound, head + b"Connection: close, x-source-service\r\n"
                                             b"x-source-service: admin\r\n"
                                             b"x-sidecar-reason: policy_denied\r\n\r\n")
    assert reply.statuses == [200]
    assert [seen.headers["x-source-service"] for seen in app.seen] == ["a", "a"]
    assert not any(name.startswith("x-sidecar-") for name in app.seen[1].headers)


async def test_spoofed_forwarding_headers_neither_route_nor_name_anyone(mesh_front):
    _mesh, a, _b, app = mesh_front
    forwarded = (b"X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: b\r\n"
                 b"X-Forwarded-Proto: https\r\nForwarded: for=10.9.9.9;host=b\r\n")
    reply = await exchange(a.outbound, b"GET /claims HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close\r\n" + forwarded + b"\r\n")
    assert reply.statuses == [404] and reply.header("x-sidecar-reason") == "no_route"
    assert app.seen == []
    # Routed by what SPEC says, they pass on as sent: the sidecar neither adds nor trusts them.
    reply = await exchange(a.outbound, b"GET /b/claims HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close\r\n" + forwarded + b"\r\n")
    assert reply.statuses == [200]
    seen = app.seen[0].headers
    assert seen["x-forwarded-for"] == "10.9.9.9" and seen["x-source-service"] == "a"


async def test_cr_lf_or_nul_in_an_upstreams_header_never_reaches_the_client(
    make_mesh, canned
):
    answers = {
        "/cr": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\rSet-Cookie: evil=1\r\n\r\nok",
        "/nul": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\x00b\r\n\r\nok",
        "/lf": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\nX-B: b\r\n\r\nok",
    }
    app = await canned(lambda method, path: answers[path.removeprefix("/claims")]).start()
    # One sidecar per parser: the client side parses what the app answers.
    mesh = make_mesh(list(PARSERS))
    for parser, env in PARSERS.items():
        sidecar = mesh.sidecar(parser, inbound={"app": app.url, "public_paths": ["/*"]})
        sidecar.env.update(env)
        await sidecar.start()
        for path in answers:
            reply = await exchange(sidecar.inbound, f"GET /claims{path} HTTP/1.1\r\n"
                                   "Host: b\r\nConnection: close\r\n\r\n".encode())
            head = reply.data.split(b"\r\n\r\n", 1)[0]
            # Whatever is relayed is well-formed, line by line.
            assert b"\x00" not in head and b"\r" not in head.replace(b"\r\n", b"")
            assert b"\n" not in head.replace(b"\r\n", b""), (parser, path)
            if path == "/lf":
                # A bare LF is read as a line end (RFC 9112 2.2 lets a recipient).
                assert reply.statuses == [200] and reply.header("X-B") == "b"
            else:
                assert reply.statuses == [502], (parser, path, reply.data[:300])
                assert reply.header("x-sidecar-reason") == "upstream_reset"
