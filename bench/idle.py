"""Idle keep-alive connections: open them, make one request on each, keep them open.

What a proxy holds for clients that keep connections open and say nothing,
as pooled app clients do. Bounded: at most `count` connections, opened
`OPEN_AT_ONCE` at a time, each step with a timeout, all of it within `within`.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

OPEN_AT_ONCE = 50
STEP_TIMEOUT = 5.0  # seconds for one connect or one answer


async def _open(host: str, port: int, path: str
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                STEP_TIMEOUT)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await asyncio.wait_for(reader.readexactly(length), STEP_TIMEOUT)
        return reader, writer
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return None


class IdleClients:
    """`count` idle keep-alive connections to `url` (loopback), once `open` has run."""

    def __init__(self, url: str, count: int) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.hostname.startswith("127."), url
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path or "/"
        self.count = count
        self.held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, within: float = 60.0) -> int:
        """Open them all, each with one answered request; how many succeeded."""
        limit = asyncio.Semaphore(OPEN_AT_ONCE)

        async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            async with limit:
                return await _open(self.host, self.port, self.path)

        opened = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(self.count))),
                                        within)
        self.held = [pair for pair in opened if pair is not None]
        return len(self.held)

    def still_open(self) -> int:
        """Connections the proxy has not closed (as far as the loop has seen)."""
        return sum(1 for reader, writer in self.held
                   if not reader.at_eof() and not writer.is_closing())

    async def close(self) -> None:
        for _, writer in self.held:
            writer.close()
        for _, writer in self.held:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        self.held = []
