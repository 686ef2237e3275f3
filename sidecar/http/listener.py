"""One HTTP listener: aiohttp's low-level server with the sidecar's limits.

aiohttp answers malformed requests itself with text/plain; here those answers
become problem+json (400 `bad_request`, 431 `headers_too_large`), exception
text never reaches a log (it may quote a header), and a client slower than
`header_timeout` to send its request headers is cut off. What aiohttp's
parsers let through but the sidecar does not speak (another HTTP version, a
transfer coding other than chunked) is refused the same way, before the
request becomes a call.

This is the one module that touches aiohttp's private attributes (the
protocol's parser state, a site's server, the client session's hidden
resend, the headers a response adds as it starts and when it sends them,
the request-target as parsed, a client WebSocket's connection): each is
named and explained here, so an aiohttp upgrade has one place to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import hdrs, web, web_protocol
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.streams import StreamReader
from yarl import URL

from sidecar.config.settings import Limits
from sidecar.http import problem
from sidecar.http.accept import Acceptor
from sidecar.stack import Reply
from sidecar.tls.contexts import check_far_side

log = logging.getLogger("sidecar.http.listener")

RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Told of every request refused before it could become a call (for audit and metrics).
OnRefused = Callable[[Reply], None]

SPOKEN = (HttpVersion10, HttpVersion11)
# More digits than any body this side of an exabyte: llhttp refuses a length past
# 2^64 as malformed, and the Python parser is held to the same (RFC 9110 8.6).
MAX_LENGTH_DIGITS = 18


# What aiohttp writes into every answer unless told otherwise: `Server`, and
# `Content-Type: application/octet-stream` on a body that names no type.
ADDED_BY_AIOHTTP = (hdrs.SERVER, hdrs.CONTENT_TYPE)


class StreamAnswer(web.StreamResponse):
    """A streamed answer that carries no header aiohttp would add of its own.

    A relayed answer keeps exactly the upstream's headers (an answer without
    a type stays without one), and the sidecar's own answers name no
    software. `Date` is still added when missing, as RFC 9110 6.6.1 asks of
    a forwarder.
    """

    async def _prepare_headers(self) -> None:
        absent = [name for name in ADDED_BY_AIOHTTP if name not in self.headers]
        await super()._prepare_headers()
        for name in absent:
            self.headers.popall(name, None)


class WholeAnswer(StreamAnswer):
    """A `StreamAnswer` whose body is in hand: its head goes out with the body in one
    write (aiohttp holds the head back when `_send_headers_immediately` is off, as
    its own `Response` does), where a streamed answer sends its head at once."""

    _send_headers_immediately = False


class Answer(StreamAnswer, web.Response):
    """A whole answer (a body in bytes) that adds no header of aiohttp's own."""


class WebSocketAnswer(StreamAnswer, web.WebSocketResponse):
    """The client side of a relayed WebSocket: a 101 with no `Server` of aiohttp's own."""


def parser_in_use() -> str:
    """`llhttp` when aiohttp parses requests with its C parser, `python` otherwise.

    The Python parser is what aiohttp falls back to without its compiled
    extensions (or with `AIOHTTP_NO_EXTENSIONS` set): it refuses the same
    smuggling vectors but is laxer with chunk extensions and trailers, and
    slower. The protocol takes its parser class from this module-level name.
    """
    return "python" if web_protocol.HttpRequestParser is HttpRequestParserPy else "llhttp"


def refusal(reason: str, detail: str, *, answer_headers: dict[str, str],
            on_refused: OnRefused | None) -> Answer:
    """The answer to a request refused before it became a call: problem+json,
    told to `on_refused` (audit, metrics), and the connection closed after it."""
    reply = problem.reply(reason, detail, headers=answer_headers)
    if on_refused is not None and reason != "internal_error":
        on_refused(reply)
    assert isinstance(reply.body, bytes)
    response = Answer(status=reply.status, body=reply.body, headers=reply.headers)
    response.force_close()
    return response


def unspoken(request: web.BaseRequest) -> str | None:
    """Why a request the parser took is still not one the sidecar speaks, or None.

    Only HTTP/1.0 and HTTP/1.1 are spoken (a client writing `HTTP/2.0` or no
    version at all is not speaking them). The one transfer coding is
    `chunked`, alone and in HTTP/1.1: any other would be relayed as if it
    were the body itself. A length too long to be one is malformed.
    """
    if isinstance(request, OtherVersion):
        return ("This sidecar speaks HTTP/1.0 and HTTP/1.1 only; the request line named "
                "another version or none. The connection is closed.")
    codings = request.headers.getall(hdrs.TRANSFER_ENCODING, [])
    if codings and (request.version != HttpVersion11
                    or ",".join(codings).strip().lower() != "chunked"):
        return ("Transfer-Encoding may only be `chunked`, and only in HTTP/1.1: any other "
                "leaves the body's length unclear. The connection is closed.")
    if len(request.headers.get(hdrs.CONTENT_LENGTH, "").strip()) > MAX_LENGTH_DIGITS:
        return "The Content-Length is not a length this sidecar reads. The connection is closed."
    return None


def request_target(request: web.BaseRequest) -> URL:
    """The request-target as the parser read it, absolute-form included.

    aiohttp's public way to it is `Request.message`, deprecated: it issues a
    DeprecationWarning once per request, a `warnings.warn` on every call.
    """
    return request._message.url


def cut(transport: asyncio.Transport | None) -> None:
    """Close `transport` at once with a reset, whatever is queued for it dropped.

    A peer that reads nothing more cannot take a close frame, and a closed (or
    merely aborted) socket is kept by the kernel, its queued bytes with it,
    for as long as the peer keeps its window open a crack: a zero linger
    makes the close a reset.
    """
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def websocket_transport(ws: aiohttp.ClientWebSocketResponse) -> asyncio.Transport | None:
    """The connection under aiohttp's client WebSocket (`_conn`: it offers no public way)."""
    connection = ws._conn
    return connection.transport if connection is not None else None


def close_now(request: web.BaseRequest) -> None:
    """Close the connection once what was written is out, without reading on.

    aiohttp lingers on a body left unread (up to 10 s) so that a client still
    sending sees the answer; for a body that will not come, or one whose
    framing is not understood, that is only a connection held.
    """
    request.protocol.force_close()


class OtherVersion(web.BaseRequest):
    """A request in a version the sidecar does not speak, to be refused.

    It is made to read as HTTP/1.1 so that the refusal's status line is one the
    client can read (RFC 9112 2.3: answer in the highest version spoken).
    """


class GuardedProtocol(web_protocol.RequestHandler):
    """aiohttp's request handler plus a header timeout and problem+json errors."""

    header_timeout: float = 10.0
    on_refused: OnRefused | None = None
    answer_headers: dict[str, str] = {}  # replaced per server, never mutated

    max_headers: int = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_lines = 0  # lines of the request head being received
        self._last_head_lines = 0  # ... and of the last head the parser took (or refused)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        if not self._request_in_progress:
            end = data.find(b"\r\n\r\n")
            self._head_lines += (data if end < 0 else data[:end]).count(b"\n")
        super().data_received(data)
        if self._request_count != count:
            self._last_head_lines, self._head_lines = self._head_lines, 0
            self._cancel_header_timer()
            self._fail_body_in_progress()
        elif (data and self._header_timer is None and not self._request_in_progress
              and not self._messages):
            self._start_header_timer()

    def _fail_body_in_progress(self) -> None:
        """A parse error in the middle of a body (a bad chunk) ends that body.

        aiohttp queues the error as the next message but leaves the body being
        read waiting for bytes that will never come; fail it so the call ends
        now, as a bad request, instead of at its timeout.
        """
        request = self._current_request
        if not self._request_in_progress or request is None or not self._messages:
            return
        error = self._messages[-1][0]
        if isinstance(error, web_protocol._ErrInfo) and not request.content.at_eof():
            request.content.set_exception(BadHttpMessage(error.message))

    def _start_header_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is not None:
            log.info("connection cut: request headers not received within header_timeout")
            self.transport.close()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        name = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        log.warning("request failed", extra={"error": name})

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        self.log_exception("request failed", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already begun")
        # The request line plus more header lines than allowed: the parser
        # refused the count (it says so only in words).
        too_many = self._last_head_lines > self.max_headers + 1
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and too_many):
            reason, detail = "headers_too_large", (
                "A request header line or the number of headers is over this sidecar's "
                "limits (limits.max_header_line, limits.max_headers).")
        elif status == 400:
            reason, detail = "bad_request", (
                "The request is not well-formed HTTP/1.1 or is ambiguous (for example both "
                "Content-Length and Transfer-Encoding). The connection is closed.")
        else:
            reason, detail = "internal_error", "The sidecar failed on this request."
        return refusal(reason, detail, answer_headers=self.answer_headers,
                       on_refused=self.on_refused)


class GuardedServer(web.Server):
    """A low-level server whose connections are `GuardedProtocol`s, and which
    refuses what its parser took but the sidecar does not speak (`unspoken`)."""

    def __init__(self, handler: RawHandler, *, limits: Limits,
                 on_refused: OnRefused | None = None,
                 answer_headers: dict[str, str] | None = None, **kwargs: Any) -> None:
        self._inner = handler
        super().__init__(
            self._checked,
            max_line_size=limits.max_header_line,
            max_field_size=limits.max_header_line,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout,
            access_log=None,
            handler_cancellation=True,
            # A body goes on as it came: a gzip upload stays gzip (and its
            # Content-Length stays true).
            auto_decompress=False,
            **kwargs,
        )
        self.header_timeout = limits.header_timeout
        self.max_headers = limits.max_headers
        self.on_refused = on_refused
        self.answer_headers = answer_headers or {}

    async def _checked(self, request: web.BaseRequest) -> web.StreamResponse:
        detail = unspoken(request)
        if detail is None:
            return await self._inner(request)
        response = refusal("bad_request", detail, answer_headers=self.answer_headers,
                           on_refused=self.on_refused)
        # Closed as soon as the answer is out, as after a parse error: a body
        # whose framing is not understood is not read (aiohttp would linger on it).
        await response.prepare(request)
        await response.write_eof()
        close_now(request)
        return response

    def _make_request(self, message: RawRequestMessage, payload: StreamReader,
                      protocol: web_protocol.RequestHandler, writer: AbstractStreamWriter,
                      task: asyncio.Task[None]) -> web.BaseRequest:
        if message.version in SPOKEN:
            return super()._make_request(message, payload, protocol, writer, task)
        message = message._replace(version=HttpVersion11, should_close=True)
        return OtherVersion(message, payload, protocol, writer, task, self._loop)

    def __call__(self) -> GuardedProtocol:
        protocol = GuardedProtocol(self, loop=self._loop, **self._kwargs)
        protocol.header_timeout = self.header_timeout
        protocol.max_headers = self.max_headers
        protocol.on_refused = self.on_refused
        protocol.answer_headers = self.answer_headers
        return protocol

    def finish_and_close(self) -> None:
        """Drain: idle keep-alive connections close now, busy ones after their answer."""
        for protocol in list(self.connections):
            if protocol._request_in_progress:
                protocol.close()
            else:
                protocol.force_close()


class Listener:
    """A started listener: its bound address, and the steps of a drain.

    Its connections come from an aiohttp site, or (TLS on) from an `Acceptor`.
    """

    def __init__(self, runner: web.BaseRunner, site: web.TCPSite | None,
                 server: GuardedServer | None = None, acceptor: Acceptor | None = None) -> None:
        self._runner = runner
        self._site = site
        self._server = server
        self._acceptor = acceptor

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound (host, port): the real port when 0 was asked."""
        if self._acceptor is not None:
            return self._acceptor.address
        assert self._site is not None
        server = self._site._server  # aiohttp keeps the asyncio server private
        sockets = getattr(server, "sockets", None) or []
        if not sockets:
            return None
        host, port = sockets[0].getsockname()[:2]
        return host, port

    @property
    def busy(self) -> bool:
        """Whether any client connection is still open."""
        return self._server is not None and bool(self._server.connections)

    def stop_accepting(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop_accepting()
            return
        assert self._site is not None
        server = self._site._server
        if server is not None:
            server.close()

    def finish_and_close(self) -> None:
        if self._server is not None:
            self._server.finish_and_close()

    async def close(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.close()
        await self._runner.cleanup()


async def start(handler: RawHandler, host: str, port: int, *, limits: Limits,
                on_refused: OnRefused | None = None,
                answer_headers: dict[str, str] | None = None,
                tls: Callable[[], ssl.SSLContext] | None = None,
                on_handshake_failed: Callable[[], None] | None = None) -> Listener:
    """Listen on host:port; `answer_headers` go on every answer made while parsing.

    With `tls` (the current server context, asked per connection) the port
    takes TLS and plain text alike (`accept.Acceptor`); a failed handshake is
    told to `on_handshake_failed`.
    """
    server = GuardedServer(handler, limits=limits, on_refused=on_refused,
                           answer_headers=answer_headers)
    # The drain has already waited up to drain_timeout when the runner is
    # cleaned up: what is still running then is cut at once.
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    if tls is not None:
        acceptor = Acceptor(server, host, port, context=tls,
                            handshake_timeout=limits.header_timeout,
                            on_failed=on_handshake_failed or (lambda: None))
        await acceptor.start()
        return Listener(runner, None, server, acceptor)
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    return Listener(runner, site, server)


async def start_app(app: web.Application, host: str, port: int) -> Listener:
    """Serve an ordinary aiohttp application (the admin port) on host:port."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return Listener(runner, site)


class PeerCheckingConnector(aiohttp.TCPConnector):
    """aiohttp's connector, plus a look at the far side's certificate right after the
    handshake, before any byte of the request is written.

    A context that can `check_peer` (`tls.contexts.MeshClientContext`) is asked
    whether the certificate carries the SPIFFE ID of the service whose name
    was checked; if not, the connection is closed and `PeerMismatch` raised.
    aiohttp checks a pinned fingerprint at the same point, but offers no hook
    of ours there: `_wrap_create_connection` is where every new connection
    (direct, and through the pool) is made.
    """

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        check_far_side(kwargs.get("ssl"), kwargs.get("server_hostname"), transport)
        return transport, protocol


def no_hidden_resend(session: aiohttp.ClientSession) -> None:
    """Stop aiohttp's client from silently sending a request a second time.

    After a reset or disconnect on a kept-alive connection aiohttp resends
    GET, PUT, DELETE, ... on its own. That hidden retry would bypass the
    retry layer (its attempt count, budget and `idempotent_methods`): every
    resend must be the retry layer's. There is no public switch; aiohttp's
    own test client turns it off this way.
    """
    session._retry_connection = False
