"""Raw HTTP/1.1 on loopback sockets: a client that writes exact bytes, an upstream that
answers exact bytes.

aiohttp's client and server both fix up what they send (framing, `Host`,
header syntax), so malformed requests and hand-made answers are written here
byte for byte.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field

READ_WITHIN = 10.0  # seconds without a byte before `exchange` stops reading
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@dataclass
class Exchange:
    """What came back on one connection: every byte, and how the connection ended."""

    data: bytes
    closed: bool  # the sidecar closed (or reset) the connection

    @property
    def statuses(self) -> list[int]:
        """The status of every response head in `data`, in order."""
        return [int(m.group(1)) for m in STATUS.finditer(self.data)]

    @property
    def status(self) -> int | None:
        statuses = self.statuses
        return statuses[0] if statuses else None

    def header(self, name: str) -> str | None:
        """The first response's header `name` (case-insensitive), or None."""
        return header_of(self.data.split(b"\r\n\r\n", 1)[0], name)

    def header_names(self) -> set[str]:
        """The lower-cased header names of the first response."""
        head = self.data.split(b"\r\n\r\n", 1)[0]
        return {line.partition(b":")[0].strip().lower().decode("latin-1")
                for line in head.split(b"\r\n")[1:] if line}


async def exchange(port: int, data: bytes, *, within: float = READ_WITHIN) -> Exchange:
    """Write `data` to 127.0.0.1:`port` and read until the peer closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        received = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), within)
            except TimeoutError:
                return Exchange(received, closed=False)
            except ConnectionError:
                return Exchange(received, closed=True)
            if not chunk:
                return Exchange(received, closed=True)
            received += chunk
    finally:
        writer.close()


@dataclass
class CannedUpstream:
    """An app on 127.0.0.1 that answers each request with the bytes
    `answer(method, path)` gives.

    It keeps each request head in `heads` and each body in `bodies` (bodies
    framed by Content-Length only), and each connection open for the next
    request.
    """

    answer: Callable[[str, str], bytes]
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> CannedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paths(self) -> list[str]:
        return [head.split(b" ", 2)[1].decode("latin-1") for head in self.heads]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.decode("latin-1").split(" ", 2)
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(
                    int(header_of(head, "Content-Length") or 0)))
                writer.write(self.answer(method, path))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def header(self, index: int, name: str) -> str | None:
        """Header `name` of the `index`th request head, or None."""
        return header_of(self.heads[index], name)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def header_of(head: bytes, name: str) -> str | None:
    """Header `name` (case-insensitive) of a message head, or None."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None
