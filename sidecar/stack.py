"""The shape every layer shares: a `Call` passes through `(call, next) -> Reply` layers.

`compose` turns an ordered list of layers and a terminal handler into one
handler. The lists themselves live in `outbound/stack.py` and
`inbound/stack.py`; they are the architecture.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from multidict import CIMultiDict
from opentelemetry.context import Context

from sidecar.config.settings import Service, ServicePolicy
from sidecar.names import HTTP_METHODS
from sidecar.paths import RouteTable
from sidecar.timer import CallTimer

Direction = Literal["outbound", "inbound"]


class Body:
    """A request body: streamed once, or buffered in memory so it can be replayed.

    `buffer(limit)` reads up to `limit` bytes; if the whole body fits, the body
    becomes replayable. Otherwise what was read is kept in front of the rest of
    the stream and the body can be sent exactly once.
    """

    __slots__ = ("_consumed", "_head", "_reading", "_stream", "_watchers", "complete", "length")

    def __init__(
        self,
        stream: AsyncIterator[bytes] | None = None,
        data: bytes | None = None,
        length: int | None = None,
    ) -> None:
        self._stream = stream
        self._head = data or b""
        self.complete = stream is None
        self.length = length if length is not None else (len(self._head) if self.complete else None)
        self._consumed = False
        self._reading = False
        self._watchers: list[tuple[Callable[[], None], Callable[[], None]]] = []

    @classmethod
    def empty(cls) -> Body:
        return cls(data=b"")

    @property
    def replayable(self) -> bool:
        return self.complete

    @property
    def is_empty(self) -> bool:
        return self.complete and not self._head

    def watch(self, on_start: Callable[[], None], on_end: Callable[[], None]) -> None:
        """Be told when reading the body from the client begins and when it is all in.

        Timers use this to stand still while the client is still sending: that
        time is the client's, not the upstream's. A body already complete calls
        neither; one already being read calls `on_start` at once.
        """
        if self.complete:
            return
        if self._reading:
            on_start()
        self._watchers.append((on_start, on_end))

    def _begin(self) -> None:
        if not self._reading:
            self._reading = True
            for on_start, _ in self._watchers:
                on_start()

    def _end(self) -> None:
        watchers, self._watchers = self._watchers, []
        for _, on_end in watchers:
            on_end()

    async def buffer(self, limit: int) -> bool:
        """Read up to `limit` bytes into memory; True if the whole body is now held."""
        if self.complete:
            return True
        if self.length is not None and self.length > limit:
            return False
        assert self._stream is not None
        parts = [self._head]
        size = len(self._head)
        self._begin()
        async for chunk in self._stream:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                self._head = b"".join(parts)
                return False
        self._head = b"".join(parts)
        self.complete = True
        self.length = size
        self._end()
        return True

    def payload(self) -> bytes | AsyncIterator[bytes]:
        """What to send upstream: the bytes when held, else the stream (once only)."""
        if self.complete:
            return self._head
        if self._consumed:
            raise RuntimeError("a streamed body can be sent only once")
        self._consumed = True
        return self._chain()

    async def _chain(self) -> AsyncIterator[bytes]:
        self._begin()
        if self._head:
            yield self._head
        assert self._stream is not None
        async for chunk in self._stream:
            yield chunk
        self._end()


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call is routed: a service's settings and its route templates.

    Built once per config (`wiring.wire`). Every layer that needs a
    per-service setting (timeout, retry, connect timeout, mesh or not) reads
    it from the call's target, never from a table of its own.
    """

    service: Service
    routes: RouteTable

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def policy(self) -> ServicePolicy:
        return self.service.policy

    @property
    def mesh(self) -> bool:
        return self.service.mesh


@dataclass(slots=True)
class CallTrace:
    """The W3C context a call came with (possibly empty) and the trace id it carries.

    Read once, before retries rewrite the headers; owned by `telemetry.tracing`,
    read by the audit for `trace_id`.
    """

    parent: Context
    trace_id: int
    client_spans: int = 0  # CLIENT spans started so far: the next one's resend count

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"


@dataclass(slots=True)
class Call:
    """One request on its way through a stack.

    `path` is the path without the query; `route` is its PHI-safe template,
    the only form of the path that telemetry and audit ever see. The fields
    after `body` are what the layers learn and tell each other; each has one
    writer, named beside it.
    """

    direction: Direction
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: Body
    source: str = "anonymous"  # the verified caller (inbound: verify_token)
    target: str = ""  # the target service's name (routing; inbound: this service)
    route: str = "/"  # templated path (routing, normalise_path)
    upstream: Target | None = None  # the routed target (routing; inbound: the app)
    endpoint: str | None = None  # this attempt's base URL (balance; inbound: the app)
    deadline: float | None = None  # monotonic time the call must end by (deadline)
    timer: CallTimer | None = None  # the call's one timer (`timed`); who runs the call closes it
    attempts: int = 0  # attempts made (retry; inbound: 1)
    retries: int = 0  # attempts after the first (retry)
    scheme: str = "http"  # the endpoint's scheme (balance, dial_tls; inbound: the edge)
    tls: bool = False  # over TLS (inbound: the edge; outbound: dial_tls, per attempt)
    peer_id: str | None = None  # the peer's SPIFFE ID (inbound: the edge; outbound: dial_tls)
    ssl_context: ssl.SSLContext | None = None  # outbound: what this attempt dials with (dial_tls)
    server_name: str | None = None  # outbound: the name the far certificate must carry (dial_tls)
    server_port: int | None = None  # the listener's port inbound, the endpoint's outbound
    started: float = 0.0  # monotonic time the call arrived (edge)
    trace: CallTrace | None = None  # (tracing)
    # A call the workflow engine makes: the instance id and the step (workflows.engine).
    workflow: str | None = None
    step: str | None = None
    # What the edge read off the wire:
    http_version: str = "1.1"
    longest_header_line: int = 0  # "name: value" as sent; the parser bounds values alone
    websocket_protocols: tuple[str, ...] | None = None  # set only for a WebSocket upgrade
    absolute_host: str | None = None  # the authority of an absolute-form target

    @property
    def target_path(self) -> str:
        """Path plus query, as sent upstream."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def websocket(self) -> bool:
        return self.websocket_protocols is not None

    def timed(self) -> CallTimer:
        """The call's timer, made on first use by the task running the call.

        Whoever runs a call through a stack closes it once done with the
        answer: the edge, the workflow engine (`workflows.calls`).
        """
        if self.timer is None:
            self.timer = CallTimer()
        return self.timer


@dataclass(slots=True)
class Reply:
    """A response on its way back. `body` is bytes, or a stream from upstream.

    `reason` is the sidecar reason code (this sidecar's own, or one relayed
    from the far sidecar); `release` returns an upstream connection to its
    pool and must be called for every reply that is dropped rather than sent.
    """

    status: int
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] = b""
    reason: str | None = None
    made_here: bool = False
    release: Callable[[], None] | None = None
    upgrade: aiohttp.ClientWebSocketResponse | None = None  # on a 101 reply

    def discard(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None


def safe_method(method: str) -> str:
    """The method as telemetry may show it: a standard one, else OTHER."""
    return method if method in HTTP_METHODS else "OTHER"


Handler = Callable[[Call], Awaitable[Reply]]


class Layer(Protocol):
    """`(call, next) -> Reply`; the second parameter is always named `next`."""

    def __call__(self, call: Call, next: Handler) -> Awaitable[Reply]: ...


def compose(*layers: Layer, terminal: Handler) -> Handler:
    """Chain `layers` in order around `terminal`; the first layer runs first.

    Every layer names its second parameter `next`; binding it with `partial`
    adds no coroutine frame of its own on the per-request path.
    """
    handler = terminal
    for layer in reversed(layers):
        handler = functools.partial(layer, next=handler)
    return handler


class RequestBodyError(Exception):
    """The client's request body failed while streaming (`reason` says how).

    The client's doing, not the upstream's: no retry, breaker or outlier
    detection counts it.
    """

    reason = "bad_request"


class BodyTooLarge(RequestBodyError):
    """The request body passed `limits.max_request_body` while streaming."""

    reason = "body_too_large"


class MalformedBody(RequestBodyError):
    """The request body's framing broke mid-stream (a bad chunk)."""


class BodyStalled(RequestBodyError):
    """The request body moved no byte for `seconds` (`limits.idle_timeout`) while streaming."""

    reason = "body_stalled"

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class UpstreamError(Exception):
    """A call to an upstream failed before a response began.

    `kind` is one of `connect-failure`, `reset`, `per-try-timeout`, `timeout`;
    `sent` says whether any byte of the request may have left.
    """

    def __init__(self, kind: str, *, sent: bool) -> None:
        super().__init__(kind)
        self.kind = kind
        self.sent = sent
