"""Where aiohttp meets the stacks: a request becomes a `Call`, a `Reply` a response.

The edge owns what must hold for every answer whatever the stack did:
hop-by-hop headers are removed both ways, a body over the limit is refused,
and a reply whose body breaks mid-stream aborts the connection so a cut
response never looks complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage
from multidict import CIMultiDict

from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.http import listener, websocket
from sidecar.http.headers import BAGGAGE, SOURCE, TIMEOUT_MS, forwardable
from sidecar.stack import (
    Body,
    BodyStalled,
    BodyTooLarge,
    Call,
    Direction,
    Handler,
    MalformedBody,
    Reply,
)
from sidecar.timer import CALL, IDLE, CallTimer
from sidecar.tls.contexts import peer_of

log = logging.getLogger("sidecar.http.edge")

# Answers after which the rest of the connection cannot be trusted to frame a
# next request: a malformed request, a body left unread, or one that stopped.
CLOSING_STATUSES = frozenset({400, 408, 413})


def request_body(request: web.BaseRequest, limit: int, idle: float | None = None) -> Body:
    if not request.body_exists:
        return Body.empty()
    return Body(stream=_limited(request, limit, idle), length=request.content_length)


async def _limited(request: web.BaseRequest, limit: int,
                   idle: float | None) -> AsyncIterator[bytes]:
    """The client's body, refused past `limit` bytes or after `idle` seconds without one.

    The call's timers stand still while the body comes in (it is the
    client's time), so this is what bounds a body that stops moving.
    """
    seen = 0
    if request.headers.get("Expect", "").lower() == "100-continue":
        # The client waits for this before sending the body; it is sent only
        # once a layer wants the body, so refusals come before any upload.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    chunks = request.content.iter_any().__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if idle is None:
                    raise
                raise BodyStalled(idle) from None
            seen += len(chunk)
            if seen > limit:
                raise BodyTooLarge
            yield chunk
    except (BadHttpMessage, web.RequestPayloadError) as exc:
        # Both parsers report a broken chunk as the payload's error.
        raise MalformedBody from exc


def to_call(request: web.BaseRequest, direction: Direction, *, body_limit: int,
            body_idle: float | None = None, source: str = "anonymous", target: str = "",
            clock: Clock = SYSTEM_CLOCK) -> Call:
    url = request.rel_url
    call = Call(
        direction=direction,
        method=request.method,
        path=url.raw_path,
        query=url.raw_query_string,
        # Only the deadline header may come in; `baggage` never travels on, and
        # only the sidecar names the caller.
        # `Expect` is answered here, hop by hop.
        headers=forwardable(request.headers, drop=(BAGGAGE, SOURCE, "Expect"),
                            keep=(TIMEOUT_MS,)),
        body=request_body(request, body_limit, body_idle),
        source=source,
        target=target,
        started=clock.monotonic(),
        http_version=f"{request.version.major}.{request.version.minor}",
        # "name: value" as sent; the parser only bounds the value on its own.
        longest_header_line=max(
            (len(name) + len(value) + 2 for name, value in request.raw_headers), default=0),
    )
    if direction == "inbound" and request.transport is not None:
        sockname = request.transport.get_extra_info("sockname")
        if sockname:
            call.server_port = sockname[1]
        call.tls, call.peer_id = peer_of(request.transport)
        if call.tls:
            call.scheme = "https"
    if websocket.is_upgrade(request):
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        call.websocket_protocols = tuple(p.strip() for p in offered.split(",") if p.strip())
    parsed = listener.request_target(request)
    if parsed.is_absolute():
        call.absolute_host = parsed.raw_authority
    return call


async def write(request: web.BaseRequest, reply: Reply, *, timer: CallTimer,
                extra: Callable[[Reply, CIMultiDict[str]], None] | None = None,
                close: bool = False, idle: float | None = None) -> web.StreamResponse:
    """Send `reply` to the client, streaming its body.

    However it ends (the client gone, the upstream cut), the upstream
    connection behind `reply` is released. A streamed body that moves no byte
    for `idle` seconds, either way, is cut (aborted like a reset).
    """
    try:
        return await _write(request, reply, timer=timer, extra=extra, close=close, idle=idle)
    finally:
        reply.discard()


async def _write(request: web.BaseRequest, reply: Reply, *, timer: CallTimer,
                 extra: Callable[[Reply, CIMultiDict[str]], None] | None,
                 close: bool, idle: float | None) -> web.StreamResponse:
    headers = forwardable(reply.headers, drop_sidecar=False)
    length = headers.popall("Content-Length", None)
    if extra is not None:
        extra(reply, headers)
    head = request.method == "HEAD"
    # A body in hand goes out with the head in one write: one send() less per
    # answer. A streamed one sends its head at once, whenever its body comes.
    kind = listener.WholeAnswer if head or isinstance(reply.body, bytes) else listener.StreamAnswer
    response = kind(status=reply.status, headers=headers)
    if isinstance(reply.body, bytes):
        response.content_length = len(reply.body)
    elif length and not head:
        response.content_length = int(length[0])
    elif length:
        response.headers["Content-Length"] = length[0]
    if close:
        response.force_close()
    await response.prepare(request)
    if head:
        pass  # a HEAD answer has headers only, whoever made it
    elif isinstance(reply.body, bytes):
        await response.write(reply.body)
    else:
        try:
            await _relay(reply.body, response, idle, timer)
        except ConnectionResetError:
            # The upstream broke off after the response began: abort so the
            # client sees a cut connection, never a complete-looking answer.
            if request.transport is not None:
                request.transport.abort()
            raise
    await response.write_eof()
    return response


async def _relay(body: AsyncIterator[bytes], response: web.StreamResponse,
                 idle: float | None, timer: CallTimer) -> None:
    """Copy `body` to the client; a stall of `idle` seconds on either side ends it.

    The idle bound is the call's timer's: moving it on per chunk is a number
    set, not a timer made. The call's deadline is still running there too.
    """
    chunks = body.__aiter__()
    timer.watch()
    try:
        while True:
            timer.set(IDLE, idle)
            chunk = await anext(chunks)
            timer.set(IDLE, idle)
            await response.write(chunk)
    except StopAsyncIteration:
        return
    except asyncio.CancelledError:
        passed = timer.take(IDLE, CALL)
        if passed is None:
            raise
        why = "stream idle for too long" if passed == IDLE else "the call's deadline passed"
        raise ConnectionResetError(why) from None
    finally:
        timer.unwatch()
        timer.set(IDLE, None)


async def serve(request: web.BaseRequest, handler: Handler, direction: Direction, *,
                body_limit: int, extra: Callable[[Call, Reply, CIMultiDict[str]], None],
                closing: Callable[[], bool], source: str = "anonymous", target: str = "",
                idle: float | None = None, clock: Clock = SYSTEM_CLOCK) -> web.StreamResponse:
    """Run one request through a stack and answer it."""
    call = to_call(request, direction, body_limit=body_limit, body_idle=idle, source=source,
                   target=target, clock=clock)
    # The call's one timer (`sidecar.timer`): the layers' bounds and the relay's.
    timer = call.timed()
    try:
        reply = await handler(call)
        if reply.upgrade is not None:
            timer.close()
            headers: CIMultiDict[str] = CIMultiDict()
            extra(call, reply, headers)
            return await websocket.relay(request, reply, headers=headers,
                                         max_message=body_limit, idle=idle)
        # After a refused upgrade the client may already be speaking the other
        # protocol: nothing more on this connection is read as HTTP.
        refused_upgrade = hdrs.UPGRADE in request.headers
        response = await write(
            request, reply, timer=timer,
            extra=lambda reply, headers: extra(call, reply, headers),
            close=closing() or reply.status in CLOSING_STATUSES or refused_upgrade,
            idle=idle,
        )
    finally:
        timer.close()
    if reply.made_here and reply.reason == BodyStalled.reason:
        # The client stopped sending: waiting on for the rest of its body
        # (aiohttp would, for a while) would hold the connection for nothing.
        listener.close_now(request)
    return response
