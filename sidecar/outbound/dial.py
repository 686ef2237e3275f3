"""How each attempt's connection is secured: mesh TLS, an outside service's https, or neither."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from sidecar.names import spiffe_id
from sidecar.stack import Call, Handler, Layer, Reply
from sidecar.tls.contexts import mesh_url
from sidecar.tls.material import MeshTLS


def dial_tls(*, mesh: MeshTLS | None, outside: Mapping[str, ssl.SSLContext]) -> Layer:
    """Per attempt, once `balance` chose the endpoint: the TLS this attempt dials with.

    With TLS on, a mesh service is dialled with TLS even where its endpoint
    says `http://` (the far sidecar's port takes TLS; the port stays), showing
    this service's certificate. The far side's certificate must carry the
    routed service's name (checked against its DNS SAN during the handshake)
    and its SPIFFE ID (checked right after); otherwise nothing is sent and the
    call is answered 502 `upstream_identity_mismatch`. A service outside the
    mesh keeps its endpoint's scheme; an `https://` one is verified against
    its `ca_file` (`outside`) or the system's trust store. Sets `call.tls`,
    `call.ssl_context`, `call.server_name`, and `call.peer_id` once the far
    side has answered. Refuses nothing itself.
    """

    async def dial_tls_layer(call: Call, next: Handler) -> Reply:
        assert call.upstream is not None and call.endpoint is not None, "after balance"
        call.peer_id = None
        if mesh is not None and call.upstream.mesh:
            call.endpoint = mesh_url(call.endpoint)
            call.scheme, call.tls = "https", True
            call.ssl_context, call.server_name = mesh.client, call.target
            reply = await next(call)
            call.peer_id = spiffe_id(mesh.trust_domain, call.target)
            return reply
        call.tls = call.scheme == "https"
        call.ssl_context, call.server_name = outside.get(call.target), None
        return await next(call)

    return dial_tls_layer

