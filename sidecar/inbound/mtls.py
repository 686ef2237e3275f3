"""Inbound mutual TLS: plain text refused in `strict`, and the certificate and token agreeing.

The handshake itself (a client certificate chaining to the mesh CA, in
date) happened before any call existed (`http.accept`); what a call learns
from it is `call.tls` and `call.peer_id`, set at the edge.
"""

from __future__ import annotations

from sidecar.http import problem
from sidecar.names import TLS_STRICT, service_of
from sidecar.stack import Call, Handler, Layer, Reply


def require_tls(*, mode: str, service: str) -> Layer:
    """Inbound, in `strict`: a call that came as plain text is refused with 400
    `tls_required` before anything of it is read, its token included; the
    connection is closed after the answer. Other modes pass every call."""
    strict = mode == TLS_STRICT

    async def require_tls_layer(call: Call, next: Handler) -> Reply:
        if strict and not call.tls:
            return problem.reply(
                "tls_required",
                f"{service} accepts only mutual TLS on this port: call it through your "
                "sidecar (localhost:15001), which dials it with TLS and its certificate.",
            )
        return await next(call)

    return require_tls_layer


def match_peer(*, mode: str, trust_domain: str | None) -> Layer:
    """Inbound, after the token check: the client certificate's SPIFFE ID must name the
    token's `iss`, so a token copied off one workload is of no use from another.
    Refuses with 401 `peer_identity_mismatch`, also for a certificate that names no
    service of this trust domain. A call without a token passes, and in `permissive`
    so does one without a client certificate (plain text, or TLS alone)."""
    # In `strict` every TLS client showed a certificate: one without a SPIFFE ID names nobody.
    certificate_required = mode == TLS_STRICT

    async def match_peer_layer(call: Call, next: Handler) -> Reply:
        shown = call.peer_id is not None or certificate_required
        if call.tls and shown and call.source != "anonymous":
            peer = service_of(call.peer_id, trust_domain)
            if peer != call.source:
                return problem.reply(
                    "peer_identity_mismatch",
                    f"The client certificate is {peer or 'not a service of this mesh'}'s, "
                    f"the token {call.source}'s: a service calls with its own certificate "
                    "and its own token.",
                )
        return await next(call)

    return match_peer_layer
