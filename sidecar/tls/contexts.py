"""SSL contexts for mesh TLS, and what a finished handshake says about the peer.

Both sides present this service's certificate and trust only the mesh CA
bundle; TLS 1.2 at least (1.3 when both speak it, as OpenSSL prefers). The
client checks the far side's host name against the routed service (its DNS
SAN) during the handshake, and `check_peer` its SPIFFE ID right after it,
before any byte of the request is sent.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from sidecar.config.settings import TLS
from sidecar.names import SPIFFE_SCHEME, TLS_STRICT, spiffe_id

MIN_VERSION = ssl.TLSVersion.TLSv1_2


class PeerMismatch(Exception):
    """The far side's certificate does not carry the routed service's SPIFFE ID."""

    def __init__(self, expected: str, found: list[str]) -> None:
        super().__init__(f"expected {expected}, found {', '.join(found) or 'no SPIFFE ID'}")
        self.expected = expected


class MeshClientContext(ssl.SSLContext):
    """The context outbound mesh calls dial with; it knows the SPIFFE ID to expect.

    The connector calls `check_peer` once the handshake is done, with the
    host name it checked (the routed service's name).
    """

    trust_domain: str = ""

    def check_peer(self, server_hostname: str | None, peercert: Mapping[str, Any] | None) -> None:
        """PeerMismatch unless the far side's certificate names `server_hostname`'s service."""
        expected = spiffe_id(self.trust_domain, server_hostname or "")
        found = peer_ids(peercert)
        if expected not in found:
            raise PeerMismatch(expected, found)


def check_far_side(context: ssl.SSLContext | None, server_hostname: str | None,
                   transport: asyncio.BaseTransport) -> None:
    """Right after a handshake, before any byte of a request is written: with a mesh
    context, PeerMismatch (and the connection closed) unless the far side's
    certificate names `server_hostname`'s service. Both clients call it: aiohttp's
    connector (WebSockets, health checks) and the lean one."""
    if not isinstance(context, MeshClientContext):
        return
    try:
        context.check_peer(server_hostname, transport.get_extra_info("peercert"))
    except PeerMismatch:
        transport.close()
        raise


def _mesh_files(context: ssl.SSLContext, tls: TLS) -> None:
    assert tls.ca_file and tls.cert_file and tls.key_file, "tls files are required when on"
    context.minimum_version = MIN_VERSION
    context.load_verify_locations(cafile=tls.ca_file)
    context.load_cert_chain(tls.cert_file, tls.key_file)


def server_context(tls: TLS) -> ssl.SSLContext:
    """The inbound port's context: a client certificate is required in `strict`, and in
    `permissive` checked when one is presented (and then recorded)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _mesh_files(context, tls)
    context.verify_mode = ssl.CERT_REQUIRED if tls.mode == TLS_STRICT else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TLS, trust_domain: str) -> MeshClientContext:
    """The outbound context: host name checked (PROTOCOL_TLS_CLIENT does), certificate required."""
    context = MeshClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _mesh_files(context, tls)
    context.trust_domain = trust_domain
    return context


def outside_context(ca_file: str) -> ssl.SSLContext:
    """For an `https://` service outside the mesh with a `ca_file` of its own."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = MIN_VERSION
    return context


def peer_ids(peercert: Mapping[str, Any] | None) -> list[str]:
    """The SPIFFE IDs among a verified peer certificate's URI SANs (`getpeercert()` form)."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ())
            if kind == "URI" and value.lower().startswith(SPIFFE_SCHEME)]


def peer_of(transport: asyncio.BaseTransport | None) -> tuple[bool, str | None]:
    """(whether the connection is TLS, the peer certificate's SPIFFE ID or None).

    The certificate was decoded once, at the handshake; this only reads it.
    """
    if transport is None or transport.get_extra_info("sslcontext") is None:
        return False, None
    found = peer_ids(transport.get_extra_info("peercert"))
    return True, found[0] if found else None


@functools.lru_cache(maxsize=1024)
def mesh_url(endpoint: str) -> str:
    """A mesh endpoint as TLS dials it: `http://b:15006` -> `https://b:15006`, and
    `http://b` -> `https://b:80` (the port stays: the far sidecar's port takes TLS)."""
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        return endpoint
    return f"https://{parts.netloc if parts.port else parts.netloc + ':80'}"
