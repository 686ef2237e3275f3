"""The lean upstream client against raw servers on 127.0.0.1 that script every byte."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from multidict import CIMultiDict

from deploy.process import CertRing
from sidecar.config.settings import TLS
from sidecar.http import client
from sidecar.tls.contexts import client_context
from tests.support import tls
from tests.support.scripted import OK, Scripted, Step

WITHIN = 5.0  # no exchange here takes longer; a hang fails instead of waiting for pytest


@pytest.fixture
async def pool() -> AsyncIterator[client.Pool]:
    made = client.Pool(idle=30.0, max_line=64 * 1024)
    yield made
    made.close()


async def send(pool: client.Pool, url: str, method: str = "GET", *,
               headers: dict[str, str] | None = None, body: client.Body = None,
               context: ssl.SSLContext | None = None,
               server_hostname: str | None = None) -> client.Response:
    async with asyncio.timeout(WITHIN):
        return await pool.send(url, method, "/claims/7?a=%2F", CIMultiDict(headers or {}), body,
                               connect_timeout=1.0, context=context,
                               server_hostname=server_hostname)


async def read(response: client.Response) -> bytes:
    async with asyncio.timeout(WITHIN):
        return b"".join([chunk async for chunk in response.body()])


async def eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WITHIN):
        while not check():
            await asyncio.sleep(0.01)


# -- what is sent ---------------------------------------------------------------


async def test_a_get_is_its_line_host_and_the_given_headers_only(pool: client.Pool):
    async with Scripted([Step(OK)]) as upstream:
        response = await send(pool, upstream.url, headers={"X-A": "1", "traceparent": "t"})
        assert await read(response) == b"ok"
    # The path as given (already encoded), Host the endpoint's authority, nothing added.
    port = upstream.url.rsplit(":", 1)[1]
    assert upstream.requests[0][1] == (
        f"GET /claims/7?a=%2F HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-A: 1\r\n"
        "traceparent: t\r\n\r\n").encode()


async def test_the_default_port_is_left_out_of_host():
    assert client.Origin("http://billing:80").authority == "billing"
    assert client.Origin("https://billing:443").authority == "billing"
    assert client.Origin("https://billing:15006").authority == "billing:15006"


@pytest.mark.parametrize(("method", "headers", "body", "framing", "sent_body"), [
    ("POST", {}, b"abc", b"Content-Length: 3\r\n", b"abc"),
    ("POST", {}, None, b"Content-Length: 0\r\n", b""),
    ("DELETE", {}, None, b"Content-Length: 0\r\n", b""),
    ("GET", {}, None, b"", b""),
    ("OPTIONS", {}, None, b"", b""),
    # The client's own length stays; a stream without one goes chunked.
    ("POST", {"Content-Length": "3"}, b"abc", b"", b"abc"),
])
async def test_framing_is_what_aiohttp_adds_for_the_same_body(
        pool: client.Pool, method: str, headers: dict[str, str], body: bytes | None,
        framing: bytes, sent_body: bytes):
    async with Scripted([Step(OK)]) as upstream:
        await read(await send(pool, upstream.url, method, headers=headers, body=body))
    head, _, rest = upstream.requests[0][1].partition(b"\r\n\r\n")
    port = upstream.url.rsplit(":", 1)[1].encode()
    given = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    assert head + b"\r\n\r\n" == (method.encode() + b" /claims/7?a=%2F HTTP/1.1\r\nHost: 127.0.0.1:"
                                  + port + b"\r\n" + given + framing + b"\r\n")
    assert rest == sent_body


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_stream_of_unknown_length_goes_chunked_and_empty_chunks_are_skipped(
        pool: client.Pool):
    async with Scripted([Step(OK)]) as upstream:
        await read(await send(pool, upstream.url, "POST", body=chunks(b"ab", b"", b"cde")))
    assert upstream.requests[0][1].endswith(
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")


async def test_a_stream_with_its_length_goes_as_it_is(pool: client.Pool):
    async with Scripted([Step(OK)]) as upstream:
        await read(await send(pool, upstream.url, "PUT", headers={"Content-Length": "5"},
                              body=chunks(b"ab", b"cde")))
    assert upstream.requests[0][1].endswith(b"Content-Length: 5\r\n\r\nabcde")


async def test_a_failing_body_surfaces_with_its_own_error_as_cause(pool: client.Pool):
    class Refused(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"a"
        raise Refused

    async with Scripted([Step(None)]) as upstream:
        with pytest.raises(client.SendFailed) as caught:
            await send(pool, upstream.url, "POST", body=failing())
    assert isinstance(caught.value.__cause__, Refused)
    assert pool.idle_count() == 0


async def test_cr_or_lf_in_a_header_is_refused_before_dialling(pool: client.Pool):
    async with Scripted([]) as upstream:
        with pytest.raises(ValueError):
            await send(pool, upstream.url, headers={"X-A": "1\r\nX-Smuggled: 2"})
    assert upstream.connections == 0


@pytest.mark.parametrize("value", ["a\x00b", "a\x1bb", "a\x7fb", "a\x0bb"])
async def test_other_control_characters_in_a_header_are_refused_before_dialling(
        pool: client.Pool, value: str):
    async with Scripted([]) as upstream:
        with pytest.raises(ValueError):
            await send(pool, upstream.url, headers={"X-A": value})
        with pytest.raises(ValueError):
            await send(pool, upstream.url, headers={value: "1"})
    assert upstream.connections == 0


async def test_a_tab_in_a_header_value_goes_as_it_is(pool: client.Pool):
    async with Scripted([Step(OK)]) as upstream:
        assert await read(await send(pool, upstream.url, headers={"X-A": "a\tb"})) == b"ok"
    assert b"X-A: a\tb\r\n" in upstream.requests[0][1]


async def test_a_path_in_the_base_url_comes_before_the_target(pool: client.Pool):
    async with Scripted([Step(OK)]) as upstream:
        await read(await send(pool, upstream.url + "/api"))
    assert upstream.requests[0][1].startswith(b"GET /api/claims/7?a=%2F HTTP/1.1\r\n")


# -- keep-alive and what ends it ------------------------------------------------


async def test_a_connection_is_reused_after_a_whole_answer(pool: client.Pool):
    async with Scripted([Step(OK), Step(OK)]) as upstream:
        for _ in range(2):
            assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 1]


async def test_connection_close_from_upstream_is_not_reused(pool: client.Pool):
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with Scripted([Step(closing), Step(OK)]) as upstream:
        for _ in range(2):
            assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 2]


async def test_an_answer_read_until_close_is_whole_and_its_connection_not_reused(
        pool: client.Pool):
    unframed = b"HTTP/1.1 200 OK\r\n\r\nuntil the end"
    async with Scripted([Step(unframed, close=True), Step(OK)]) as upstream:
        assert await read(await send(pool, upstream.url)) == b"until the end"
        assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 2]


async def test_a_chunked_answer_is_joined_and_its_connection_reused(pool: client.Pool):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    async with Scripted([Step(chunked), Step(OK)]) as upstream:
        response = await send(pool, upstream.url)
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert await read(response) == b"abcde"
        assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 1]


async def test_head_answers_have_no_body_whatever_their_length_says(pool: client.Pool):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    async with Scripted([Step(head), Step(OK)]) as upstream:
        response = await send(pool, upstream.url, "HEAD")
        assert (response.status, response.headers["Content-Length"]) == (200, "1000")
        assert await read(response) == b""
        assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 1]


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_204_and_304_have_no_body(pool: client.Pool, status: bytes):
    async with Scripted([Step(b"HTTP/1.1 " + status + b"\r\nETag: x\r\n\r\n"), Step(OK)]) as up:
        response = await send(pool, up.url)
        assert response.status == int(status[:3])
        assert await read(response) == b""
        assert await read(await send(pool, up.url)) == b"ok"
    assert [number for number, _ in up.requests] == [1, 1]


async def test_interim_answers_are_skipped_for_the_final_one(pool: client.Pool):
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with Scripted([Step(interim + OK)]) as upstream:
        response = await send(pool, upstream.url, "POST", body=b"x")
        assert response.status == 200
        assert await read(response) == b"ok"


async def test_headers_keep_duplicates_and_order(pool: client.Pool):
    answer = (b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-B: 2\r\nSet-Cookie: c=3\r\n"
              b"Content-Length: 0\r\n\r\n")
    async with Scripted([Step(answer)]) as upstream:
        response = await send(pool, upstream.url)
        await read(response)
    assert list(response.headers.items()) == [
        ("Set-Cookie", "a=1"), ("X-B", "2"), ("Set-Cookie", "c=3"), ("Content-Length", "0")]


async def test_a_pooled_connection_the_far_side_closed_is_dropped_before_use(
        pool: client.Pool):
    async with Scripted([Step(OK, close=True), Step(OK)]) as upstream:
        assert await read(await send(pool, upstream.url)) == b"ok"
        # Idle in the pool when the far side hangs up; the client sees the EOF.
        await eventually(lambda: upstream.ended == 1)
        await asyncio.sleep(0.05)
        assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 2]


async def test_a_connection_lost_before_the_answer_is_a_reset_and_never_resent(
        pool: client.Pool):
    async with Scripted([Step(OK), Step(None, close=True)]) as upstream:
        await read(await send(pool, upstream.url))
        with pytest.raises(ConnectionResetError):
            await send(pool, upstream.url)
    # Each request went out once: no second connection carried it again.
    assert [number for number, _ in upstream.requests] == [1, 1]


async def test_a_break_mid_body_is_a_reset_from_the_body(pool: client.Pool):
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    async with Scripted([Step(cut, close=True)]) as upstream:
        response = await send(pool, upstream.url)
        with pytest.raises(ConnectionResetError):
            await read(response)
    assert pool.idle_count() == 0


# -- malformed answers ------------------------------------------------------------


async def test_a_malformed_status_line_is_a_malformed_response(pool: client.Pool):
    async with Scripted([Step(b"HTTP/1.1 OK fine\r\n\r\n")]) as upstream:
        with pytest.raises(client.MalformedResponse):
            await send(pool, upstream.url)
    assert pool.idle_count() == 0


async def test_header_lines_up_to_the_limit_pass_and_longer_ones_do_not(pool: client.Pool):
    def answer(size: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * size + b"\r\nContent-Length: 2\r\n\r\nok"

    async with Scripted([Step(answer(60 * 1024)), Step(answer(70 * 1024))]) as upstream:
        assert await read(await send(pool, upstream.url)) == b"ok"
        with pytest.raises(client.MalformedResponse):
            await send(pool, upstream.url)


# -- release, discard, cancellation ----------------------------------------------


async def test_a_reply_discarded_unread_closes_its_connection(pool: client.Pool):
    async with Scripted([Step(OK), Step(OK)]) as upstream:
        response = await send(pool, upstream.url)
        response.release()
        await eventually(lambda: upstream.closed_by_client == 1)
        assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 2]
    assert pool.idle_count() == 1


async def test_cancelled_mid_body_the_connection_is_closed_not_pooled(pool: client.Pool):
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst"
    async with Scripted([Step(partial), Step(OK)]) as upstream:
        response = await send(pool, upstream.url)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in response.body():
                first.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(first.wait(), WITHIN)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.idle_count() == 0
        await eventually(lambda: upstream.closed_by_client == 1)
        assert await read(await send(pool, upstream.url)) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 2]


async def test_cancelled_while_waiting_for_the_answer_the_connection_is_closed(
        pool: client.Pool):
    async with Scripted([Step(None)]) as upstream:
        task = asyncio.ensure_future(send(pool, upstream.url))
        await eventually(lambda: len(upstream.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: upstream.closed_by_client == 1)
    assert pool.idle_count() == 0


async def test_reading_pauses_while_the_body_is_not_consumed(pool: client.Pool):
    size = 32 * 1024 * 1024
    sent_all = asyncio.Event()

    async def big(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()
        sent_all.set()

    async with Scripted([Step(big)]) as upstream:
        response = await send(pool, upstream.url)
        await asyncio.sleep(0.5)
        # Nothing read: the client stopped reading, so the upstream's writes wait.
        assert not sent_all.is_set()
        assert len(await read(response)) == size
        assert sent_all.is_set()


# -- connecting ---------------------------------------------------------------------


async def test_refused_and_unknown_hosts_are_connect_failures(pool: client.Pool):
    async with Scripted([]) as upstream:
        url = upstream.url
    with pytest.raises(client.ConnectFailed):
        await send(pool, url)
    with pytest.raises(client.ConnectFailed):
        await send(pool, "http://no-such-host.invalid:80")


async def test_a_reply_lost_unreleased_frees_its_connection(pool: client.Pool):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000
    async with Scripted([Step(big)]) as upstream:
        response = await send(pool, upstream.url)
        assert pool.busy_count() == 1
        del response  # a layer dropped it without release: nothing holds it now
        gc.collect()
        assert pool.busy_count() == 0
        await eventually(lambda: upstream.closed_by_client == 1)


async def test_closing_the_pool_under_a_waiting_request_is_a_reset(pool: client.Pool):
    async with Scripted([Step(None)]) as upstream:
        task = asyncio.ensure_future(send(pool, upstream.url))
        await eventually(lambda: len(upstream.requests) == 1)
        pool.close()
        with pytest.raises(ConnectionResetError):
            await task
        assert pool.busy_count() == 0


async def test_closing_the_pool_closes_idle_connections(pool: client.Pool):
    async with Scripted([Step(OK)]) as upstream:
        await read(await send(pool, upstream.url))
        assert pool.idle_count() == 1
        pool.close()
        await eventually(lambda: upstream.closed_by_client == 1)
    assert pool.idle_count() == 0


async def test_idle_connections_close_after_the_idle_timeout():
    short = client.Pool(idle=0.1)
    try:
        async with Scripted([Step(OK)]) as upstream:
            await read(await send(short, upstream.url))
            assert short.idle_count() == 1
            await eventually(lambda: upstream.closed_by_client == 1)
        assert short.idle_count() == 0
    finally:
        short.close()


# -- TLS ------------------------------------------------------------------------------


def server_side(ring: CertRing, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ring.ca_file))
    context.load_cert_chain(str(cert), str(key))
    return context


async def test_tls_to_the_routed_service_goes_through(pool: client.Pool, tmp_path: Path):
    ring = CertRing(tmp_path).generate(["a", "b"])
    context = server_side(ring, ring.cert_file("b"), ring.key_file("b"))
    mesh = client_context(TLS(**ring.tls("a")), ring.trust_domain)
    async with Scripted([Step(OK), Step(OK)], context=context) as upstream:
        for _ in range(2):
            response = await send(pool, upstream.url, context=mesh, server_hostname="b")
            assert await read(response) == b"ok"
    assert [number for number, _ in upstream.requests] == [1, 1]
    assert upstream.requests[0][1].startswith(b"GET /claims/7?a=%2F HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_a_far_side_with_another_spiffe_id_gets_no_byte(pool: client.Pool,
                                                              tmp_path: Path):
    ring = CertRing(tmp_path).generate(["a"])
    # The DNS SAN says b, so the handshake passes; the SPIFFE ID says c.
    cert, key = tls.mislabelled(ring, tmp_path / "impostor", "b", "c")
    mesh = client_context(TLS(**ring.tls("a")), ring.trust_domain)
    async with Scripted([Step(OK)], context=server_side(ring, cert, key)) as upstream:
        with pytest.raises(client.IdentityRefused):
            await send(pool, upstream.url, context=mesh, server_hostname="b")
        await eventually(lambda: upstream.connections == 1 and upstream.closed_by_client == 1)
    assert upstream.received == b""
    assert pool.idle_count() == 0


async def test_a_certificate_that_fails_verification_is_refused(pool: client.Pool,
                                                                tmp_path: Path):
    ring = CertRing(tmp_path).generate(["a", "b"])
    context = server_side(ring, ring.cert_file("b"), ring.key_file("b"))
    mesh = client_context(TLS(**ring.tls("a")), ring.trust_domain)
    async with Scripted([Step(OK)], context=context) as upstream:
        # The certificate is b's: asked for c, the handshake fails on the host name.
        with pytest.raises(client.IdentityRefused):
            await send(pool, upstream.url, context=mesh, server_hostname="c")
    assert upstream.received == b""
