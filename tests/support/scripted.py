"""A raw HTTP/1.1 upstream on 127.0.0.1 whose every answer byte is scripted, and
which records the bytes of every request and how each connection ended."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Step:
    """One scripted answer: bytes (or a coroutine that writes), then maybe close."""

    answer: bytes | Writer | None
    close: bool = False


@dataclass
class Scripted:
    """An upstream that answers request n with step n and records what it read."""

    steps: list[Step]
    context: ssl.SSLContext | None = None
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, bytes)
    connections: int = 0
    closed_by_client: int = 0
    ended: int = 0  # connections over, whoever closed them
    received: bytes = b""
    url: str = ""
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  ssl=self.context)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.context else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.connections += 1
        number = self.connections
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    self.closed_by_client += 1
                    return
                self.received += request
                self.requests.append((number, request))
                step = self.steps.pop(0) if self.steps else Step(OK)
                if isinstance(step.answer, bytes):
                    writer.write(step.answer)
                elif step.answer is not None:
                    await step.answer(writer)
                await writer.drain()
                if step.close:
                    return
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            self.closed_by_client += 1
        finally:
            writer.close()
            self.ended += 1


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request as bytes (head and body, by its framing), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)
    if b"transfer-encoding: chunked" in lower:
        return head + await reader.readuntil(b"0\r\n\r\n")
    return head
