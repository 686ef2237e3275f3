"""The terminal handler: one HTTP exchange with an upstream over a pooled session.

It never follows redirects, never decompresses, never adds headers of its own
(no User-Agent, no Accept-Encoding), and maps every way a call can fail
before the response begins onto `UpstreamError` for `classify`.

The session holds two keep-alive pools, closed together: the lean client's
(`client.Pool`), which every ordinary exchange goes through, and aiohttp's,
for WebSocket upgrades and the health checks.
"""

from __future__ import annotations

from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict

from sidecar import reasons
from sidecar.http import client, listener, websocket
from sidecar.http.headers import REASON
from sidecar.stack import Call, Handler, Reply, RequestBodyError, UpstreamError
from sidecar.tls.contexts import PeerMismatch

E = TypeVar("E", bound=BaseException)

MAX_RESPONSE_HEADER_LINE = 64 * 1024
# An answer whose body came whole with its head, up to this size, is relayed as
# one piece; statuses whose Content-Length does not describe a body they carry.
ARRIVED_LIMIT = 64 * 1024
NO_BODY = frozenset({204, 304})
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Connector(listener.PeerCheckingConnector):
    """aiohttp's connector with the lean pool beside it: whoever closes the session
    closes both."""

    def __init__(self, *, lean: client.Pool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lean = lean

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.lean.close()
        await super().close(abort_ssl=abort_ssl)


def lean_pool(session: aiohttp.ClientSession) -> client.Pool:
    """The lean pool of a session that `new_session` made."""
    connector = session.connector
    if not isinstance(connector, Connector):
        raise TypeError("a session from transport.new_session is needed")
    return connector.lean


def new_session(*, connect_timeout: float = 1.0, idle: float = 30.0) -> aiohttp.ClientSession:
    """One keep-alive pool per process, shared by every upstream.

    `trust_env=False`: the app may set HTTP_PROXY to this very sidecar; the
    sidecar itself must never go through a proxy. DNS answers are cached only
    briefly so a changed address is picked up.
    """
    # Pooled per endpoint and SSL context: a TLS connection serves many calls, and
    # a rotated context makes new connections while the old ones idle out.
    connector = Connector(
        lean=client.Pool(idle=idle, max_line=MAX_RESPONSE_HEADER_LINE),
        limit=0, limit_per_host=0, keepalive_timeout=idle, ttl_dns_cache=5,
        enable_cleanup_closed=True,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        # Upstream answers may carry long header lines (cookies, CSPs).
        max_line_size=MAX_RESPONSE_HEADER_LINE,
        max_field_size=MAX_RESPONSE_HEADER_LINE,
    )
    # Every resend must be the retry layer's, never aiohttp's own.
    listener.no_hidden_resend(session)
    return session


async def exchange(session: aiohttp.ClientSession, call: Call, base_url: str, *,
                   connect_timeout: float) -> Reply:
    """Send `call` to `base_url` over the session's lean pool (`client`) and return the
    upstream's reply with its body streaming."""
    # Hop-by-hop headers went at the edge; Host is the endpoint's own.
    headers = call.headers
    if "Host" in headers:
        headers = headers.copy()
        headers.popall("Host")
    body = None if call.body.is_empty else call.body.payload()
    try:
        response = await lean_pool(session).send(
            base_url, call.method,
            # Encoded as it stands: the path the policy saw is the path sent.
            call.target_path, headers, body,
            connect_timeout=connect_timeout, context=call.ssl_context,
            server_hostname=call.server_name,
        )
    except client.IdentityRefused as exc:
        # The far side is not who the call was routed to: nothing was sent.
        raise UpstreamError("identity-mismatch", sent=False) from exc
    except client.ConnectFailed as exc:
        raise UpstreamError("connect-failure", sent=False) from exc
    except client.MalformedResponse as exc:
        # The upstream's answer could not be parsed: sending it again will not help.
        raise UpstreamError("bad-response", sent=True) from exc
    except client.SendFailed as exc:
        # Sending failed part way; when it was our own body limit, say so.
        body_error = _cause(exc, RequestBodyError)
        if body_error is not None:
            raise body_error from exc
        raise UpstreamError("reset", sent=True) from exc
    except ConnectionError as exc:
        raise UpstreamError("reset", sent=True) from exc
    reply_headers: CIMultiDict[str] = CIMultiDict(response.headers)
    mesh = call.upstream is not None and call.upstream.mesh
    whole: bytes | None = None
    framed = "Content-Length" in reply_headers and response.status not in NO_BODY
    if framed and call.method != "HEAD":
        # Already here whole (and framed by its length, so its length stays true).
        whole = response.arrived(ARRIVED_LIMIT)
    return Reply(
        status=response.status,
        headers=reply_headers,
        # A break mid-body surfaces as ConnectionResetError.
        body=response.body() if whole is None else whole,
        # Only a far sidecar's own code of the table passes on (never the app's text).
        reason=reasons.relayed(reply_headers.get(REASON), mesh=mesh),
        release=response.release,
    )


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in the chain of causes of `exc`."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def send_to(session: aiohttp.ClientSession, *, max_message: int) -> Handler:
    """Terminal handler: sends each call to `call.endpoint`, within the connect
    timeout of `call.upstream` (outbound, `balance` chose the endpoint; inbound,
    it is the app). A WebSocket's messages from upstream are held to `max_message`
    bytes."""

    async def send(call: Call) -> Reply:
        assert call.upstream is not None and call.endpoint is not None, "call not routed"
        connect_timeout = call.upstream.policy.connect_timeout
        if call.websocket:
            try:
                return await websocket.connect(session, call, call.endpoint,
                                               connect_timeout=connect_timeout,
                                               max_message=max_message)
            except (aiohttp.ClientConnectorCertificateError, PeerMismatch) as exc:
                raise UpstreamError("identity-mismatch", sent=False) from exc
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamError("connect-failure", sent=False) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamError("reset", sent=True) from exc
        return await exchange(session, call, call.endpoint, connect_timeout=connect_timeout)

    return send
