"""How the edge puts an answer on the client's connection: an answer whose body is in
hand goes out in one write with its head; a streamed one sends its head at once,
before any of its body has come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config.settings import Limits
from sidecar.http import edge, listener
from sidecar.stack import Reply
from sidecar.timer import CallTimer

pytestmark = pytest.mark.timeout(30)
WITHIN = 5.0


class Written:
    """Every `write` the answer made on the client's transport, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def spy(self, request: web.BaseRequest) -> None:
        transport = request.transport
        assert transport is not None
        write, writelines = transport.write, transport.writelines

        def recording(data: bytes | bytearray | memoryview) -> None:
            self.writes.append(bytes(data))
            write(data)

        def recording_lines(lines: Iterable[bytes | bytearray | memoryview]) -> None:
            lines = list(lines)
            self.writes.append(b"".join(lines))
            writelines(lines)

        transport.write = recording  # type: ignore[method-assign]
        transport.writelines = recording_lines  # type: ignore[method-assign]


async def serving(make_reply: Callable[[], Reply], written: Written) -> listener.Listener:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        written.spy(request)
        timer = CallTimer()
        try:
            return await edge.write(request, make_reply(), timer=timer)
        finally:
            timer.close()

    return await listener.start(handler, "127.0.0.1", 0, limits=Limits())


async def ask(server: listener.Listener, method: str = "GET") -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    address = server.address
    assert address is not None
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"{method} /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    return reader, writer


@pytest.mark.parametrize(("method", "size"), [("GET", 50), ("HEAD", 50), ("GET", 5000)])
async def test_an_answer_in_hand_goes_out_in_one_write(method: str, size: int) -> None:
    """(aiohttp joins a small answer into one `write`, a larger one goes to `writelines`.)"""
    written = Written()
    body = b'{"claim": "accepted"}' * size
    server = await serving(lambda: Reply(200, CIMultiDict({"Content-Type": "application/json"}),
                                         body), written)
    try:
        reader, writer = await ask(server, method)
        async with asyncio.timeout(WITHIN):
            answer = await reader.read()
        writer.close()
    finally:
        await server.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and f"Content-Length: {len(body)}".encode() in head
    assert rest == (b"" if method == "HEAD" else body)
    assert written.writes == [answer]


async def test_a_streamed_answer_sends_its_head_before_its_body_comes() -> None:
    written = Written()
    gate = asyncio.Event()

    async def stream() -> AsyncIterator[bytes]:
        await gate.wait()
        yield b"late"

    server = await serving(lambda: Reply(200, CIMultiDict({"Content-Length": "4"}), stream()),
                           written)
    try:
        reader, writer = await ask(server)
        async with asyncio.timeout(WITHIN):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and not gate.is_set()
        gate.set()
        async with asyncio.timeout(WITHIN):
            rest = await reader.read()
        writer.close()
    finally:
        await server.close()
    assert rest == b"late"
    assert written.writes == [head, b"late"]
