"""A TCP fault proxy for integration tests: sits between a client and an upstream.

`FaultProxy` listens on 127.0.0.1 (an ephemeral port by default) and relays
every accepted connection to the upstream port, breaking it the way `mode`
says:

- "pass": relay both ways untouched.
- "latency": relay, but hold each upstream->client chunk for `latency` s.
- "blackhole": read and drop what the client sends; never answer or close.
- "refuse": nothing listens, so connects fail with ECONNREFUSED. Enter and
  leave it with `await set_mode(...)`; the port number stays the same.
- "reset_before_response": read the client's first bytes, then reset (RST)
  without contacting the upstream.
- "reset_mid_body": relay the request, relay the response up to `cut_after`
  bytes (default: end of headers + 10 body bytes), then reset the client.
- "close_idle": relay, and once a response is complete and the connection
  has been quiet for `idle_close` s, close it (FIN), as an upstream dropping
  an idle keep-alive connection would.

The mode is read when a connection is accepted, so a change reaches pooled
keep-alive connections only through new ones; "latency" is the exception:
it is read at every chunk, so it also slows live relaying connections.
Waits go through `clock` (a `sidecar.clock.Clock`), so a `FakeClock` makes
"latency" and "close_idle" run without real waiting.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.tasks import TaskGroup

MODES = (
    "pass",
    "latency",
    "blackhole",
    "refuse",
    "reset_before_response",
    "reset_mid_body",
    "close_idle",
)
CHUNK_BYTES = 64 * 1024
BODY_BYTES_BEFORE_RESET = 10
HEAD_END = b"\r\n\r\n"

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_CLOSE = range(6)


def cut_point(received: bytes, cut_after: int | None) -> int | None:
    """Where "reset_mid_body" cuts the response stream, once that is known."""
    if cut_after is not None:
        return cut_after
    end = received.find(HEAD_END)
    return None if end < 0 else end + len(HEAD_END) + BODY_BYTES_BEFORE_RESET


class ResponseFramer:
    """Follows HTTP/1.1 response framing through a byte stream.

    It only learns where each response ends, so that "idle" can mean
    "between responses". A response framed by the connection closing never
    ends, and a HEAD response is taken to carry its Content-Length body, so
    "close_idle" never fires after one of those.
    """

    def __init__(self) -> None:
        self.completed = 0
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0

    @property
    def between_responses(self) -> bool:
        return self._state == _HEAD and not self._buffer

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self._state == _HEAD:
            return self._read_head()
        if self._state in (_BODY, _CHUNK_DATA):
            return self._skip_data()
        if self._state == _CHUNK_SIZE:
            return self._read_chunk_size()
        if self._state == _TRAILERS:
            return self._read_trailer()
        self._buffer.clear()  # _UNTIL_CLOSE: nothing left to learn
        return False

    def _take_line(self, terminator: bytes) -> bytes | None:
        end = self._buffer.find(terminator)
        if end < 0:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + len(terminator)]
        return line

    def _read_head(self) -> bool:
        head = self._take_line(HEAD_END)
        if head is None:
            return False
        status, headers = _parse_head(head)
        if status == 101:
            self._state = _UNTIL_CLOSE  # a tunnel from here on
        elif 100 <= status < 200:
            pass  # interim; the final response head follows
        elif status in (204, 304):
            self._finish()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
            self._state = _BODY
            if self._remaining == 0:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE
        return True

    def _skip_data(self) -> bool:
        taken = min(self._remaining, len(self._buffer))
        if taken == 0 and self._remaining > 0:
            return False
        del self._buffer[:taken]
        self._remaining -= taken
        if self._remaining == 0:
            if self._state == _BODY:
                self._finish()
            else:
                self._state = _CHUNK_SIZE
        return True

    def _read_chunk_size(self) -> bool:
        line = self._take_line(b"\r\n")
        if line is None:
            return False
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            self._state = _TRAILERS
        else:
            self._remaining = size + 2  # the data and its CRLF
            self._state = _CHUNK_DATA
        return True

    def _read_trailer(self) -> bool:
        line = self._take_line(b"\r\n")
        if line is None:
            return False
        if line == b"":
            self._finish()
        return True

    def _finish(self) -> None:
        self.completed += 1
        self._state = _HEAD


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a reset rather than an orderly close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone: nothing left to reset
    writer.transport.abort()


class _Quiet:
    """What "close_idle" watches on one connection: is it between exchanges, and since when."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.framer = ResponseFramer()
        self.since = clock.monotonic()
        self.changed = asyncio.Event()
        self._request_open = False

    def client_sent(self) -> None:
        self._request_open = True
        self._touch()

    def upstream_sent(self, chunk: bytes) -> None:
        before = self.framer.completed
        self.framer.feed(chunk)
        if self.framer.completed > before:
            self._request_open = False
        self._touch()

    def idle(self) -> bool:
        return (
            self.framer.completed > 0 and self.framer.between_responses and not self._request_open
        )

    def _touch(self) -> None:
        self.since = self._clock.monotonic()
        self.changed.set()


class FaultProxy:
    """Relays 127.0.0.1:`port` to `upstream_host`:`upstream_port`, faulting as `mode` says."""

    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream_host = "127.0.0.1"
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self.latency = 0.5
        self.cut_after: int | None = None
        self.idle_close = 0.2
        self.clock: Clock = SYSTEM_CLOCK
        self.connections = 0
        self.requests_forwarded = 0
        self.first_bytes: list[bytes] = []  # what each client connection sent first, as sent
        self._mode = "pass"
        self._server: asyncio.Server | None = None
        self._running = False
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks = TaskGroup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        _check_mode(mode)
        if "refuse" in (mode, self._mode) and mode != self._mode:
            raise ValueError("entering or leaving 'refuse' moves the listener: await set_mode()")
        self._mode = mode

    async def set_mode(self, mode: str) -> None:
        """Switch modes, closing or reopening the listener (same port) around "refuse"."""
        _check_mode(mode)
        if self._running and mode == "refuse":
            self._close_listener()
        elif self._running and self._server is None:
            await self._listen()
        self._mode = mode

    async def start(self) -> FaultProxy:
        self._running = True
        await self._listen()
        if self._mode == "refuse":
            self._close_listener()  # the port is now known and stays reserved for us
        return self

    async def stop(self) -> None:
        self._running = False
        self._close_listener()
        await self._tasks.close()
        # A connection task cancelled before it ran never reached its cleanup.
        for writer in list(self._clients):
            writer.transport.abort()
        self._clients.clear()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        # Server.close() stops listening at once; wait_closed() would also wait
        # for live connections (Python 3.12+), which "blackhole" holds forever.
        if self._server is not None:
            self._server.close()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._clients.add(writer)
        name = f"fault-proxy-{self.port}-conn-{self.connections}"
        self._tasks.start(name, self._serve(self._mode, reader, writer))

    async def _serve(
        self, mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if mode == "blackhole":
                await self._swallow(reader)
            elif mode == "reset_before_response":
                await reader.read(CHUNK_BYTES)
                _reset(writer)
            elif mode != "refuse":  # accepted just before the listener closed: drop it
                await self._relay(mode, reader, writer)
        except OSError:
            pass  # the client or upstream went away: the connection is over either way
        except asyncio.CancelledError:
            writer.transport.abort()  # stop(): don't wait to flush to a client
            raise
        finally:
            writer.close()  # an orderly close (FIN) unless already reset or aborted
            self._clients.discard(writer)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK_BYTES):
            pass
        # Even after the client's EOF, keep our side open until stop().
        await asyncio.get_running_loop().create_future()

    async def _relay(
        self, mode: str, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            return  # no upstream: the client sees its connection closed
        quiet = _Quiet(self.clock)
        upload = self._upload(client_r, upstream_w, quiet)
        helpers = [self._tasks.start("fault-proxy-upload", upload)]
        if mode == "close_idle":
            watcher = self._close_when_idle(quiet, client_w, upstream_w)
            helpers.append(self._tasks.start("fault-proxy-idle", watcher))
        try:
            await self._download(mode, upstream_r, client_w, quiet)
        except BaseException:
            upstream_w.transport.abort()
            raise
        finally:
            for helper in helpers:
                helper.cancel()
            upstream_w.close()

    async def _upload(
        self, client_r: asyncio.StreamReader, upstream_w: asyncio.StreamWriter, quiet: _Quiet
    ) -> None:
        try:
            first = True
            while chunk := await client_r.read(CHUNK_BYTES):
                quiet.client_sent()
                upstream_w.write(chunk)
                await upstream_w.drain()
                if first:
                    self.requests_forwarded += 1
                    self.first_bytes.append(chunk)
                    first = False
            upstream_w.write_eof()  # pass the client's half-close on
        except OSError:
            # The download side ends when it sees the upstream go.
            upstream_w.transport.abort()

    async def _download(
        self,
        mode: str,
        upstream_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        quiet: _Quiet,
    ) -> None:
        received = b""
        while chunk := await upstream_r.read(CHUNK_BYTES):
            if self._mode == "latency":
                await self.clock.sleep(self.latency)
            if mode == "reset_mid_body":
                received += chunk
                cut = cut_point(received, self.cut_after)
                if cut is not None and len(received) >= cut:
                    client_w.write(chunk[: len(chunk) - (len(received) - cut)])
                    await client_w.drain()
                    _reset(client_w)
                    return
            client_w.write(chunk)
            await client_w.drain()
            quiet.upstream_sent(chunk)

    async def _close_when_idle(
        self, quiet: _Quiet, client_w: asyncio.StreamWriter, upstream_w: asyncio.StreamWriter
    ) -> None:
        while True:
            quiet.changed.clear()
            if not quiet.idle():
                await quiet.changed.wait()
                continue
            remaining = quiet.since + self.idle_close - self.clock.monotonic()
            if remaining <= 0:
                client_w.close()
                upstream_w.close()  # the download sees EOF and the connection ends
                return
            await self.clock.sleep(remaining)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


__all__ = ["MODES", "FaultProxy", "ResponseFramer", "cut_point"]
