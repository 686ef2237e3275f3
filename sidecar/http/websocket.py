"""WebSocket upgrades: identity and policy as for any call, then frames relayed as they are.

The stack runs unchanged; only the terminal and the edge differ. The terminal
opens the upstream WebSocket and returns a 101 `Reply` holding it; the edge
accepts the client's upgrade and relays frames both ways until either side
closes. Other upgrades (h2c) are never forwarded: `Upgrade` is hop-by-hop and
is removed like any other.

A message is relayed once whole, so each is held in memory: a message over
`max_message` bytes (`limits.max_request_body`) either way closes that side
with 1009 (message too big), and the other side with the same code, rather
than buffering without end. Both sides are closed with the code the first
side closed with, made one a close frame may carry (`sendable`).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.http import listener, problem
from sidecar.http.headers import REASON, forwardable
from sidecar.reasons import REASONS, relayed
from sidecar.stack import Call, Reply

WEBSOCKET = "websocket"
# The handshake headers are the client library's own on each hop.
HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
             "Sec-WebSocket-Protocol", "Host")


# Either side of a relayed WebSocket: the client's (aiohttp's server side) or upstream's.
Socket = aiohttp.ClientWebSocketResponse | web.WebSocketResponse


def _reader_limit(max_message: int) -> int:
    """aiohttp's `max_msg_size` for messages of at most `max_message` bytes: it refuses
    a message of `max_msg_size` or more, from the frame's header on, before
    buffering any of it; 0 would mean no limit, and it holds at most 2^32 - 1."""
    return min(max_message + 1, 2**32 - 1)


def is_upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade", "").lower()
    connection = request.headers.get("Connection", "").lower()
    return upgrade == WEBSOCKET and "upgrade" in connection and request.method == "GET"


async def connect(session: aiohttp.ClientSession, call: Call, base_url: str, *,
                  connect_timeout: float, max_message: int) -> Reply:
    """Open the upstream WebSocket; a refused handshake comes back as its status."""
    protocols = list(call.websocket_protocols or ())
    headers = forwardable(call.headers, drop=HANDSHAKE, drop_sidecar=False)
    url = URL(base_url.replace("http", "ws", 1) + call.target_path, encoded=True)
    try:
        upstream = await session.ws_connect(
            url, headers=headers, protocols=protocols, autoclose=False, autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            max_msg_size=_reader_limit(max_message),
            ssl=call.ssl_context or True, server_hostname=call.server_name,
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The far side refused the upgrade: its answer goes back as it came,
        # reason included. Its body is gone with the handshake, so a problem
        # body is rebuilt from the reason when there is one.
        headers = CIMultiDict(exc.headers or {})
        mesh = call.upstream is not None and call.upstream.mesh
        reason = relayed(headers.get(REASON), mesh=mesh)
        status = exc.status or 502
        known = REASONS.get(reason or "")
        if known is not None and known.status == status:
            refused = problem.reply(known.code, "The far side refused the WebSocket upgrade.")
            refused.made_here = False
            return refused
        return Reply(status=status, headers=headers, reason=reason)
    return Reply(status=101, headers=CIMultiDict(), upgrade=upstream)


async def relay(request: web.BaseRequest, reply: Reply, *, headers: CIMultiDict[str],
                max_message: int, idle: float | None) -> web.StreamResponse:
    """Accept the client's upgrade (with `headers`) and relay frames until either side closes.

    A side may stay quiet as long as it likes, but one that takes no message
    for `idle` seconds (`limits.idle_timeout`: it stopped reading) is cut, as
    a relayed body that stops moving is, and the other side is told 1001.
    """
    upstream = reply.upgrade
    assert upstream is not None, "relay takes a 101 reply"
    client = listener.WebSocketAnswer(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False,
        max_msg_size=_reader_limit(max_message),
    )
    client.headers.extend(headers)
    await client.prepare(request)

    # The first side to close names the code both are closed with.
    codes: list[int] = []
    stalled: list[Socket] = []  # sides that took nothing for `idle`: cut, not closed

    async def pipe(source: Socket, sink: Socket) -> None:
        code: int | None = None
        try:
            while True:
                message = await source.receive()
                if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break
                text = message.type == aiohttp.WSMsgType.TEXT
                data = message.data.encode("utf-8") if text else message.data
                if len(data) > max_message:
                    # Only a compressed message gets here: aiohttp bounds it
                    # once inflated, at one byte more than the limit.
                    code = aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                    break
                try:
                    async with asyncio.timeout(idle):
                        if text:
                            await sink.send_str(message.data)
                        else:
                            await sink.send_bytes(data)
                except TimeoutError:
                    stalled.append(sink)
                    code = aiohttp.WSCloseCode.GOING_AWAY
                    break
        except Exception:
            codes.append(aiohttp.WSCloseCode.INTERNAL_ERROR)
            raise
        if code is None:
            # The code the source closed with: the one it sent (CLOSE), or the one
            # aiohttp closed it with after a protocol error or a message too big
            # (ERROR: 1002, 1009), by when `close_code` may be that close's echo.
            if message.type == aiohttp.WSMsgType.CLOSE:
                code = message.data
            elif message.type == aiohttp.WSMsgType.ERROR:
                code = getattr(message.data, "code", None)
            code = code or source.close_code
        codes.append(sendable(code))
        # Closed here, before the relay cancels the other pipe: aiohttp marks a
        # client socket whose receive is cancelled as closed abnormally, and
        # its far end would be told 1006 rather than this code (tested).
        if sink not in stalled:
            await _close(sink, codes[0], idle)

    both = [asyncio.ensure_future(pipe(client, upstream)),
            asyncio.ensure_future(pipe(upstream, client))]
    try:
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in both:
            task.cancel()
        await asyncio.gather(*both, return_exceptions=True)
        # Closing one side wakes the pipe reading it, which may end first and
        # cancel the other before its close went out: both are closed here
        # with the first code. A side that stopped reading is cut instead.
        code = codes[0] if codes else aiohttp.WSCloseCode.INTERNAL_ERROR
        if upstream in stalled or not await _close(upstream, code, idle):
            listener.cut(listener.websocket_transport(upstream))
        if client in stalled or not await _close(client, code, idle):
            listener.cut(request.transport)
    return client


async def _close(socket: Socket, code: int, within: float | None) -> bool:
    """Close `socket` with `code`; False when it did not take the close in time."""
    try:
        async with asyncio.timeout(within):
            await socket.close(code=code)
    except TimeoutError:
        return False
    return True


# Codes RFC 6455 (7.4) lets an endpoint put in a close frame: the defined ones
# and those for libraries (3000-3999) and applications (4000-4999).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def sendable(code: int | None) -> int:
    """The close code to pass on for `code`, one a close frame may carry.

    No code (1005) is a normal close; a connection lost without one (1006) is
    the other side gone (1001); what may not be sent (1015, reserved or out of
    range) is an internal error (1011).
    """
    if code is None or code == 1005:
        return aiohttp.WSCloseCode.OK
    if code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE:
        return aiohttp.WSCloseCode.GOING_AWAY
    if code in _SENDABLE or 3000 <= code <= 4999:
        return code
    return aiohttp.WSCloseCode.INTERNAL_ERROR
