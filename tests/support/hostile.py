"""Tools of the hostile-input corpus: a canary that counts connections, and raw HTTP/1.1.

The canary listens on loopback and counts every connection made to it: a test
points URLs, hosts or key locations at it and proves that nothing dialled.
`exchange` sends request bytes exactly as given (duplicate headers, non-UTF-8
values, any target form) and reads the whole answer. `audit_record_after`
reads a sidecar's audit log as it grows, one case after another.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.audit import read_records

EXCHANGE_WITHIN = 20.0  # seconds an answer may take before the test fails
AUDIT_WITHIN = 10.0  # seconds for an audit record to appear


@dataclass
class Canary:
    """A loopback listener that counts connections and answers none of them.

    It listens on 127.0.0.1 and, where the machine has IPv6, on the same port
    of ::1, so a dial of `[::1]:port` is counted too.
    """

    host: str = "127.0.0.1"
    connections: int = 0
    port: int = 0
    _servers: list[asyncio.Server] = field(default_factory=list, repr=False)

    async def start(self) -> Canary:
        server = await asyncio.start_server(self._accept, self.host, 0)
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        try:
            self._servers.append(await asyncio.start_server(self._accept, "::1", self.port))
        except OSError:
            pass  # no IPv6 loopback here (or the port is taken there): IPv4 alone
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()


@dataclass(frozen=True)
class Answer:
    """A response as it came: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def reason(self) -> str | None:
        return self.headers.get("x-sidecar-reason")

    def json(self) -> Any:
        return json.loads(self.body)


def request(target: bytes, headers: list[tuple[bytes, bytes]], *, method: bytes = b"GET",
            host: bytes = b"localhost") -> bytes:
    """The bytes of one HTTP/1.1 request with no body, closing the connection after it."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Connection: close", b"", b""]
    return b"\r\n".join(lines)


async def exchange(port: int, data: bytes) -> Answer:
    """Send `data` to 127.0.0.1:`port` and read the answer until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=EXCHANGE_WITHIN)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status=int(status_line.split()[1]), headers=headers, body=body)


async def audit_record_after(path: Path, count: int) -> dict[str, Any]:
    """The first audit record after the first `count`, once it is written."""
    ends = time.monotonic() + AUDIT_WITHIN
    while time.monotonic() < ends:
        records = read_records(path)
        if len(records) > count:
            return records[count]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no audit record after the first {count} in {path}")
