"""A lean HTTP/1.1 client for the upstream exchange: asyncio protocols, aiohttp's parser, one pool.

aiohttp's `ClientSession.request` was the largest cost the sidecar added per
call (issue 10): URL building, a timeout object per request, tracing
signals, cookies and auto headers, none of which an exchange needs. Here a
request is its request line, the headers it was given, `Host` and its
body's framing; the answer is read by the parser aiohttp itself reads
answers with (llhttp when compiled, its Python parser otherwise), so
answers parse exactly as before.

What `transport.exchange` relies on:

- Nothing is added but `Host` (the endpoint's authority, as aiohttp sends
  it) and the framing aiohttp would add for the same body: `Content-Length`
  for bytes or an empty body of a method that carries one, `Transfer-Encoding:
  chunked` for a stream of unknown length.
- A request is written once. A pooled connection the far side has closed is
  dropped before use; one that breaks in use is an error, never a resend.
- A connection goes back to the pool only after its request was sent whole
  and its answer read to the end, and when nothing said it must close;
  anything else (cancellation included) closes it.
- With TLS, a `MeshClientContext` checks the far side's SPIFFE ID right
  after the handshake, before any byte of the request is written.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp.http import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.tls.contexts import PeerMismatch, check_far_side

Body = bytes | AsyncIterator[bytes] | None
# (base URL, TLS context or None, server name): a connection serves only calls that would
# have made the very same connection, so a rotated context gets connections of its own.
Key = tuple[str, ssl.SSLContext | None, str | None]

# aiohttp's client defaults, kept so that answers parse and buffer as they did.
READ_LIMIT = 2**16  # body bytes buffered before reading from the upstream pauses
MAX_HEADERS = 128
# Methods for which aiohttp sends no `Content-Length: 0` when there is no body.
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})
# A bytes body up to this size goes out in the same write as the head.
COALESCE = 16 * 1024
# Transports without flow control say so with one of these (as aiohttp ignores them).
NO_FLOW_CONTROL = (AttributeError, NotImplementedError, RuntimeError)


def _verified_context() -> ssl.SSLContext:
    """What `https://` is dialled with when no context is given: the system's trust
    store, as aiohttp's default verified context."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


# Made at import, as aiohttp makes its own: loading the trust store blocks.
VERIFIED = _verified_context()


class ConnectFailed(Exception):
    """No connection could be made (refused, no such host, timed out): nothing was sent."""


class IdentityRefused(Exception):
    """The far side's certificate failed verification or names another SPIFFE ID:
    nothing was sent."""


class MalformedResponse(Exception):
    """The upstream's answer is not HTTP/1.1 that the parser reads (or a header line
    is over the limit)."""


class SendFailed(Exception):
    """The request body failed while being sent; its own exception is the cause."""


class Origin:
    """What one base URL means for dialling: where to connect, and the `Host` to send."""

    __slots__ = ("authority", "host", "port", "prefix", "tls")

    def __init__(self, base_url: str) -> None:
        url = URL(base_url, encoded=True)
        assert url.raw_host is not None and url.port is not None, "endpoint has no host"
        self.host: str = url.raw_host
        self.port: int = url.port
        self.tls = url.scheme == "https"
        # What aiohttp sends as Host: host:port, the port left out when it is the default.
        authority = url.host_port_subcomponent
        assert authority is not None
        self.authority: str = authority
        # A path in the base URL (`inbound.app: http://127.0.0.1:8000/api`) comes
        # before every target, as it stands.
        rest = base_url.partition("://")[2]
        slash = rest.find("/")
        self.prefix: str = "" if slash < 0 else rest[slash:]


@functools.lru_cache(maxsize=1024)
def origin_of(base_url: str) -> Origin:
    """Endpoints come from config: each is parsed once, not per call."""
    return Origin(base_url)


# Control characters aiohttp refuses in a request line or header, but for CR and
# LF, which `request_head` counts instead (its own line ends are the only ones).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def request_head(method: str, target: str, authority: str, headers: CIMultiDict[str],
                 framing: str) -> bytes:
    """The request line and headers, `Host` first (as aiohttp writes them), then
    `framing` (`Content-Length` or `Transfer-Encoding` when added).

    ValueError when the request line, a name or a value holds a control
    character (tab aside), as aiohttp refuses: CR or LF would end the header
    early and smuggle another, NUL is read differently by different servers.
    """
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"]
    parts += [f"{name}: {value}\r\n" for name, value in headers.items()]
    parts.append(framing)
    parts.append("\r\n")
    text = "".join(parts)
    lines = len(headers) + 3 + (framing != "")
    if (text.count("\n") != lines or text.count("\r") != lines
            or _CONTROL.search(text) is not None):
        raise ValueError("a control character in the request line or a header")
    return text.encode("utf-8")


def framing(method: str, headers: CIMultiDict[str], body: Body) -> tuple[str, bool]:
    """The framing header aiohttp adds for this body, and whether to send it chunked."""
    if "Content-Length" in headers:
        return "", False
    if body is None:
        return ("" if method in BODYLESS_METHODS else "Content-Length: 0\r\n"), False
    if isinstance(body, bytes):
        return f"Content-Length: {len(body)}\r\n", False
    return "Transfer-Encoding: chunked\r\n", True


class Connection(asyncio.Protocol):
    """One connection to an upstream, with the parser of the answer under way.

    Reading pauses when the answer's body buffer is full (its StreamReader
    asks) and resumes as the consumer drains it; a streamed request body
    waits while the transport's write buffer is full.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.key: Key | None = None
        self.idle_since = 0.0
        # False once anything says this connection cannot frame another exchange.
        self.reusable = True
        self._parser: Any = None
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if data:
                # Bytes nobody asked for: what follows cannot be framed as an answer.
                self.close()
            return
        try:
            messages, upgraded, _ = parser.feed_data(data)
        except Exception as exc:
            self._broken(MalformedResponse(type(exc).__name__), exc)
            return
        for message, payload in messages:
            self._answer(message, payload)
        if upgraded:
            self.reusable = False

    def eof_received(self) -> None:
        # The far side is done: an answer read until close ends here, and the
        # connection is of no further use. Returning None lets the transport close.
        self.reusable = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.reusable = False
        self.transport = None
        payload = self._payload
        if self._parser is not None and payload is not None and not payload.is_eof():
            if exc is None:
                try:
                    # Ends an answer read until close; one with a length or chunks still
                    # owed raises.
                    self._parser.feed_eof()
                except Exception as cause:
                    _cut(payload, cause)
            else:
                # A reset is never the end of an answer, even one read until close.
                _cut(payload, exc)
        head = self._head
        if head is not None and not head.done():
            failure = ConnectionResetError("upstream closed the connection before answering")
            failure.__cause__ = exc
            head.set_exception(failure)
        self._wake_writer(ConnectionResetError("upstream connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer(None)

    # -- what the parser's StreamReader calls -------------------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._parser is not None:
            self._parser.pause_reading()
        if self.transport is not None:
            try:
                self.transport.pause_reading()
            except NO_FLOW_CONTROL:
                pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if resume_parser:
            # The parser kept what it had not fed while paused: feed it now.
            self.data_received(b"")
        if not self._reading_paused and self.transport is not None:
            try:
                self.transport.resume_reading()
            except NO_FLOW_CONTROL:
                pass

    # -- one exchange ----------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and with nothing that says it must close (an EOF while idle included)."""
        return self.reusable and self.transport is not None and not self.transport.is_closing()

    def begin(self, *, head_only: bool, max_line: int,
              ) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        """Get ready for an answer: a fresh parser (a HEAD's answer has no body)."""
        # The parser asks only for `pause_reading`, `resume_reading` and `connected`
        # of the protocol it is given (aiohttp's BaseProtocol in aiohttp's client).
        protocol: Any = self
        self._parser = HttpResponseParser(
            protocol, self._loop, READ_LIMIT,
            max_line_size=max_line, max_field_size=max_line, max_headers=MAX_HEADERS,
            payload_exception=ConnectionResetError, response_with_body=not head_only,
            # aiohttp's client reads an answer without a length until close.
            read_until_eof=True, auto_decompress=False,
        )
        self._payload = None
        self._head = self._loop.create_future()
        return self._head

    def send(self, head: bytes, body: Body, *, chunked: bool) -> None:
        """Write the request; a streamed body goes on in a task of this connection's own."""
        transport = self.transport
        assert transport is not None, "sending on a closed connection"
        if isinstance(body, bytes) and len(body) <= COALESCE:
            transport.write(head + body)
            return
        transport.write(head)
        if isinstance(body, bytes):
            transport.write(body)
        elif body is not None:
            # Kept on the connection, and cancelled when it closes: never lost.
            self._writer = self._loop.create_task(self._stream(body, chunked),
                                                  name="upstream request body")

    @property
    def sent(self) -> bool:
        """Whether the whole request is out (a streamed body to its end)."""
        writer = self._writer
        return writer is None or (writer.done() and not writer.cancelled())

    def finish(self) -> None:
        """The exchange is over: bytes from now on are nobody's answer."""
        self._parser = None
        self._payload = None
        self._head = None
        self._writer = None
        if self._reading_paused:
            # Idle, it must read on: an EOF from the far side is how it learns to go.
            self.resume_reading(resume_parser=False)

    def close(self, failure: Exception | None = None) -> None:
        """Close at once, whatever is under way (cancellation, a reply dropped unread).

        An answer still awaited fails with `failure`, or is cancelled without one.
        """
        self.reusable = False
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        head = self._head
        if head is not None:
            if head.done():
                if not head.cancelled():
                    head.exception()  # retrieved: nobody else will look
            elif failure is not None:
                head.set_exception(failure)
            else:
                head.cancel()
        if self.transport is not None:
            self.transport.close()

    def _answer(self, message: RawResponseMessage, payload: StreamReader) -> None:
        if 100 <= message.code < 200 and message.code != 101:
            return  # interim (100 Continue, 103 Early Hints): the final answer follows
        head = self._head
        if head is None or head.done():
            self.close()  # a second answer to one request: the upstream is confused
            return
        if message.should_close:
            self.reusable = False  # `Connection: close`, HTTP/1.0, or read until close
        self._payload = payload
        head.set_result((message, payload))

    def _broken(self, failure: Exception, cause: Exception) -> None:
        """The answer does not parse: whoever waits is told, and the connection closes."""
        failure.__cause__ = cause
        head = self._head
        if head is not None and not head.done():
            head.set_exception(failure)
        elif self._payload is not None:
            _cut(self._payload, cause)
        self._parser = None
        self.close()

    async def _stream(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        chunks = body.__aiter__()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except Exception as exc:
                self._body_failed(exc)
                return
            if not chunk or self.transport is None:
                # An empty chunk would end a chunked body; a lost connection failed
                # the exchange already.
                continue
            if chunked:
                self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                self.transport.write(chunk)
            try:
                await self._drained()
            except ConnectionError:
                return  # connection_lost told whoever waits
        if chunked and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")

    def _body_failed(self, exc: Exception) -> None:
        """The body's source failed: the request is cut, so the far side never takes it as
        whole, and whoever waits for the answer learns why."""
        failure = SendFailed("request body failed")
        failure.__cause__ = exc
        head = self._head
        if head is not None and not head.done():
            head.set_exception(failure)
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    async def _drained(self) -> None:
        if not self._writing_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("upstream connection lost")
        self._drain = self._loop.create_future()
        await self._drain

    def _wake_writer(self, exc: Exception | None) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


def _cut(payload: StreamReader, cause: BaseException) -> None:
    """A body that broke off: its reader raises ConnectionResetError."""
    failure = ConnectionResetError("upstream broke off mid-body")
    failure.__cause__ = cause
    payload.set_exception(failure)


class Response:
    """An upstream's answer, its body still streaming from its connection.

    `release` returns the connection to the pool when the body was read to its
    end and nothing says the connection must close; otherwise it closes it.
    """

    __slots__ = ("_conn", "_payload", "_pool", "headers", "status")

    def __init__(self, message: RawResponseMessage, payload: StreamReader, conn: Connection,
                 pool: Pool) -> None:
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self._payload = payload
        self._conn: Connection | None = conn
        self._pool = pool

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a break mid-body raises ConnectionResetError."""
        try:
            async for chunk in self._payload.iter_any():
                yield chunk
        finally:
            self.release()

    def arrived(self, limit: int) -> bytes | None:
        """The whole body, if all of it (at most `limit` bytes) came with the head;
        the connection is then released at once. Else None, and nothing is read.

        A small answer is most often in the same segment as its head: relaying
        it as one piece spares the stream's machinery per chunk.
        """
        payload = self._payload
        if not payload.is_eof() or payload.exception() is not None:
            return None
        if payload.total_bytes > limit:
            return None
        data = payload.read_nowait(-1)
        self.release()
        return data

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        payload = self._payload
        whole = payload.at_eof() and payload.exception() is None and conn.sent
        self._pool.put_back(conn, reuse=whole)

    def __del__(self) -> None:
        # A reply lost without being released (a layer that dropped it) must not
        # hold its connection, nor the body bytes buffered in it, for ever.
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                self._pool.drop(conn)
            except RuntimeError:
                pass  # the loop is already closed: so is the socket with it


class Pool:
    """Idle keep-alive connections per `Key`, closed after `idle` seconds unused.

    No limit on connections: as aiohttp's connector here (`limit=0`), the
    bulkheads bound what is in flight.
    """

    def __init__(self, *, idle: float = 30.0, max_line: int = 8190) -> None:
        self._idle_timeout = idle
        self._max_line = max_line
        self._idle: dict[Key, list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(self, base_url: str, method: str, target: str, headers: CIMultiDict[str],
                   body: Body, *, connect_timeout: float, context: ssl.SSLContext | None,
                   server_hostname: str | None) -> Response:
        """Send one request to `base_url` and return the answer once its head is in.

        `target` goes on the request line exactly as given (already encoded).
        Raises ConnectFailed or IdentityRefused (nothing sent), MalformedResponse,
        SendFailed (the body's own error as its cause) or ConnectionError (a reset).
        """
        origin = origin_of(base_url)
        extra, chunked = framing(method, headers, body)
        head = request_head(method, origin.prefix + target, origin.authority, headers, extra)
        key = (base_url, context if origin.tls else None, server_hostname)
        conn = self._take(key)
        if conn is None:
            conn = await self._open(origin, connect_timeout=connect_timeout,
                                    context=context, server_hostname=server_hostname)
        conn.key = key
        self._busy.add(conn)
        try:
            answer = conn.begin(head_only=method == "HEAD", max_line=self._max_line)
            conn.send(head, body, chunked=chunked)
            message, payload = await answer
        except BaseException:
            # Cancelled or failed part way: the connection's state is unknown.
            self.drop(conn)
            raise
        return Response(message, payload, conn, self)

    def put_back(self, conn: Connection, *, reuse: bool) -> None:
        """Where a finished exchange's connection goes: the pool, or closed."""
        self._busy.discard(conn)
        if not (reuse and conn.usable and not self._closed) or conn.key is None:
            conn.close()
            return
        conn.finish()
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(conn.idle_since + self._idle_timeout, self._sweep)

    def idle_count(self) -> int:
        """Idle connections held now (for tests and the bench)."""
        return sum(len(conns) for conns in self._idle.values())

    def busy_count(self) -> int:
        """Connections lent to an exchange not yet released (for tests)."""
        return len(self._busy)

    def close(self) -> None:
        """Close every connection, idle or busy; later releases close theirs."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        for conn in list(self._busy):
            # Whoever waits for an answer learns of a reset, not of a
            # cancellation nobody asked for.
            conn.close(ConnectionResetError("the client was closed"))
        self._busy.clear()

    def _take(self, key: Key) -> Connection | None:
        """The most recently used idle connection still fit for use, or None.

        One the far side closed (or sent an EOF on) while idle is dropped here,
        before a byte is written to it.
        """
        conns = self._idle.get(key)
        if not conns:
            return None
        now = asyncio.get_running_loop().time()
        while conns:
            conn = conns.pop()
            if conn.usable and now - conn.idle_since < self._idle_timeout:
                return conn
            conn.close()
        return None

    async def _open(self, origin: Origin, *, connect_timeout: float,
                    context: ssl.SSLContext | None, server_hostname: str | None) -> Connection:
        if self._closed:
            raise ConnectFailed("the client is closed")
        loop = asyncio.get_running_loop()
        tls = (context or VERIFIED) if origin.tls else None
        # The name the certificate must carry, as aiohttp derives it.
        hostname = (server_hostname or origin.host).rstrip(".") if tls is not None else None
        try:
            async with asyncio.timeout(connect_timeout):
                transport, conn = await loop.create_connection(
                    functools.partial(Connection, loop), origin.host, origin.port,
                    ssl=tls, server_hostname=hostname)
        except ssl.SSLCertVerificationError as exc:
            raise IdentityRefused("certificate verification failed") from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(type(exc).__name__) from exc
        try:
            check_far_side(tls, hostname, transport)
        except PeerMismatch as exc:
            raise IdentityRefused("the far side is another service") from exc
        return conn

    def drop(self, conn: Connection) -> None:
        """A busy connection whose exchange cannot end well: closed, and forgotten."""
        self._busy.discard(conn)
        conn.close()

    def _sweep(self) -> None:
        """Close connections idle for `idle` seconds; come back when the next one is due."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due: float | None = None
        for key, conns in list(self._idle.items()):
            kept = []
            for conn in conns:
                if conn.usable and now - conn.idle_since < self._idle_timeout:
                    kept.append(conn)
                else:
                    conn.close()
            if kept:
                self._idle[key] = kept
                oldest = kept[0].idle_since + self._idle_timeout
                due = oldest if due is None else min(due, oldest)
            else:
                del self._idle[key]
        if due is not None:
            self._sweeper = loop.call_at(due, self._sweep)
