"""What the client side of one upstream exchange costs: aiohttp's `ClientSession.request`
against the lean client (`sidecar.http.client`), in CPU µs per request.

`python -m bench.client_cost` starts `bench.upstream` (the 1 KiB answer) as a
process of its own on 127.0.0.1, so that this process's CPU time
(`time.process_time`) is the client's alone, and sends N sequential keep-alive
GETs with each contender in turn, three rounds in rotated order:

- `floor`: a bare asyncio protocol writing a fixed request and counting the
  answer's bytes: what any client pays for the loop and the socket;
- `aiohttp`: `session.request` configured as `transport.exchange` called it
  before the lean client (`new_session`'s session, a `ClientTimeout` per call,
  the body read with `iter_any`, then `release`);
- `lean`: `client.Pool.send`, the body read, `release`;
- `exchange`: `transport.exchange` itself with a `Call`, as the stacks call it.

Client-side cost is a contender's figure less the floor. The machine may be
shared: compare ratios, not absolutes. `CLIENT_COST_REQUESTS` (default 3000)
and `CLIENT_COST_SECONDS` (default 20, per run) bound each run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import cast

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar.http import client, transport
from sidecar.server import event_loop_factory
from sidecar.stack import Body, Call

REQUESTS = int(os.environ.get("CLIENT_COST_REQUESTS", "3000"))
SECONDS = float(os.environ.get("CLIENT_COST_SECONDS", "20"))
ROUNDS = 3
WARM_UP = 200
PATH = "/claims/7"

Send = Callable[[], Awaitable[int]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(port)])
    ends = time.monotonic() + 10
    while time.monotonic() < ends:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return upstream
        except OSError:
            time.sleep(0.05)
    upstream.kill()
    raise SystemExit("the upstream did not start")


class Floor(asyncio.Protocol):
    """Writes a fixed GET and counts the answer's bytes: no parsing, no headers."""

    def __init__(self, answer_size: int) -> None:
        self.answer_size = answer_size
        self.got = 0
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.answer_size and self.done is not None:
            self.done.set_result(None)


async def answer_size(base: str) -> int:
    """The upstream's whole answer in bytes (its head varies only by the Date's value)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(base).port)
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return len(data.replace(b"Connection: close\r\n", b""))


async def floor(base: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    size = await answer_size(base)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: Floor(size), "127.0.0.1", URL(base).port)
    request = f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    async def send() -> int:
        protocol.got = 0
        protocol.done = loop.create_future()
        assert protocol.transport is not None
        protocol.transport.write(request)
        await protocol.done
        return 200

    async def close() -> None:
        assert protocol.transport is not None
        protocol.transport.close()

    return send, close


async def with_aiohttp(base: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    session = transport.new_session()
    headers: CIMultiDict[str] = CIMultiDict({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                             + "-01"})

    async def send() -> int:
        response = await session.request(
            "GET", URL(base + PATH, encoded=True), headers=headers.copy(), data=None,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=1.0, connect=1.0),
            ssl=True, server_hostname=None)
        async for _ in response.content.iter_any():
            pass
        response.release()
        return response.status

    return send, session.close


async def with_lean(base: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    pool = client.Pool(idle=30.0, max_line=transport.MAX_RESPONSE_HEADER_LINE)
    headers: CIMultiDict[str] = CIMultiDict({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                             + "-01"})

    async def send() -> int:
        response = await pool.send(base, "GET", PATH, headers, None, connect_timeout=1.0,
                                   context=None, server_hostname=None)
        async for _ in response.body():
            pass
        return response.status

    async def close() -> None:
        pool.close()

    return send, close


async def with_exchange(base: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    session = transport.new_session()

    async def send() -> int:
        call = Call(direction="outbound", method="GET", path=PATH, query="",
                    headers=CIMultiDict({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                         + "-01"}), body=Body.empty())
        reply = await transport.exchange(session, call, base, connect_timeout=1.0)
        if not isinstance(reply.body, bytes):  # a body that came whole is bytes already
            async for _ in reply.body:
                pass
        reply.discard()
        return reply.status

    return send, session.close


CONTENDERS = {"floor": floor, "aiohttp": with_aiohttp, "lean": with_lean,
              "exchange": with_exchange}


async def run_one(name: str, base: str) -> float:
    """CPU µs per request of one contender over one run."""
    send, close = await CONTENDERS[name](base)
    try:
        for _ in range(WARM_UP):
            assert await send() == 200
        ends = time.monotonic() + SECONDS
        started = time.process_time()
        done = 0
        while done < REQUESTS and time.monotonic() < ends:
            assert await send() == 200
            done += 1
        return (time.process_time() - started) / done * 1e6
    finally:
        await close()


async def measure(base: str) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for round_ in range(ROUNDS):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            figures[name].append(await run_one(name, base))
    return figures


def report(figures: dict[str, list[float]]) -> None:
    floor_median = sorted(figures["floor"])[ROUNDS // 2]
    print(f"CPU µs per request, {REQUESTS} sequential keep-alive GETs, {ROUNDS} rounds")
    for name, runs in figures.items():
        median = sorted(runs)[ROUNDS // 2]
        client_side = median - floor_median
        print(f"  {name:9} median {median:7.1f}  runs {' '.join(f'{r:.1f}' for r in runs)}"
              f"  client side (less floor) {client_side:6.1f}")
    aio = sorted(figures["aiohttp"])[ROUNDS // 2] - floor_median
    lean = sorted(figures["lean"])[ROUNDS // 2] - floor_median
    if aio > 0:
        print(f"  lean client side / aiohttp client side: {lean / aio:.2f}"
              f" (saves {100 * (1 - lean / aio):.0f}%)")


def main() -> None:
    port = free_port()
    upstream = start_upstream(port)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            figures = runner.run(measure(f"http://127.0.0.1:{port}"))
        report(figures)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
