"""The inbound port's accept loop when TLS is on: TLS or plain text, told by the first byte.

A TLS connection opens with a handshake record, whose first byte is 0x16; an
HTTP/1.1 request line opens with a letter. Each accepted socket is peeked
(MSG_PEEK consumes nothing) until its first byte arrives, then given to the
HTTP server as it is, or after a TLS handshake with the context current at
that moment (so rotated files reach new connections only). Plain text is
served: the inbound stack decides, and in `strict` it answers 400
`tls_required`. A handshake that fails (no certificate, an untrusted or
expired one, a client that gives up) closes the connection and is reported
through `on_failed`, so it is audited and counted like any refusal.

Nothing here reads past the first byte or names anything of the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from sidecar.tasks import TaskGroup

log = logging.getLogger("sidecar.http.accept")

TLS_HANDSHAKE = 0x16  # the content type of a TLS handshake record (RFC 8446 5.1)

ProtocolFactory = Callable[[], asyncio.Protocol]


class Acceptor:
    """Listens on host:port and hands each connection to `factory`, with TLS when it asks."""

    def __init__(self, factory: ProtocolFactory, host: str, port: int, *,
                 context: Callable[[], ssl.SSLContext], handshake_timeout: float,
                 on_failed: Callable[[], None], backlog: int = 1024) -> None:
        self._factory = factory
        self._bind = (host, port)
        self._context = context
        self._timeout = handshake_timeout
        self._on_failed = on_failed
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks = TaskGroup()

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        self._sock = socket.create_server(self._bind, family=family, backlog=self._backlog)
        self._sock.setblocking(False)
        self._loop_task = self._tasks.start("inbound-accept", self._accept())

    @property
    def address(self) -> tuple[str, int] | None:
        if self._sock is None:
            return None
        host, port = self._sock.getsockname()[:2]
        return host, port

    def stop_accepting(self) -> None:
        """No new connections; those being accepted or served go on."""
        sock, self._sock = self._sock, None
        task, self._loop_task = self._loop_task, None
        if task is not None and not task.done() and sock is not None:
            # Closed once the loop has let go of it: its descriptor is not reused under it.
            task.add_done_callback(lambda _: sock.close())
            task.cancel()
        elif sock is not None:
            sock.close()

    async def close(self) -> None:
        self.stop_accepting()
        await self._tasks.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors, and the like: wait, go on
                log.warning("accept failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(0.1)
                continue
            self._tasks.start("inbound-connection", self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            async with asyncio.timeout(self._timeout):
                first = await _peek(conn)
        except (TimeoutError, OSError):
            conn.close()  # nothing sent: no request, no refusal to record
            return
        if not first:
            conn.close()
            return
        if first[0] != TLS_HANDSHAKE:
            await loop.connect_accepted_socket(self._factory, conn)
            return
        try:
            # asyncio closes the socket itself when the handshake fails.
            await loop.connect_accepted_socket(self._factory, conn, ssl=self._context(),
                                               ssl_handshake_timeout=self._timeout)
        except (ssl.SSLError, OSError, TimeoutError):
            self._on_failed()


async def _peek(conn: socket.socket) -> bytes:
    """The first byte the peer sent, left in the socket; b"" when it closed first."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        readable: asyncio.Future[None] = loop.create_future()

        def ready(future: asyncio.Future[None] = readable) -> None:
            if not future.done():
                future.set_result(None)

        loop.add_reader(conn.fileno(), ready)
        try:
            await readable
        finally:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(conn.fileno())
