"""The TLS layers: strict refuses plain text, certificate and token agree, how attempts dial."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deploy.process import CertRing
from sidecar.config import settings
from sidecar.config.settings import TLS
from sidecar.inbound.mtls import match_peer, require_tls
from sidecar.outbound.dial import dial_tls
from sidecar.stack import Call, UpstreamError, compose
from sidecar.telemetry.tracing import Tracing, plan_export, server_span
from sidecar.tls.contexts import (
    PeerMismatch,
    client_context,
    mesh_url,
    outside_context,
    peer_ids,
)
from sidecar.tls.material import MeshTLS
from tests.support.calls import Next, make_call, target

TD = "mesh.test"


def inbound(*, tls: bool, peer: str | None, source: str = "anonymous") -> Call:
    call = make_call("/claims/1", direction="inbound", source=source)
    call.tls, call.peer_id = tls, None if peer is None else f"spiffe://{TD}/{peer}"
    return call


async def test_strict_refuses_plain_text_before_anything_else() -> None:
    app = Next()
    strict = compose(require_tls(mode="strict", service="b"), terminal=app)
    reply = await strict(inbound(tls=False, peer=None))
    assert (reply.status, reply.reason) == (400, "tls_required")
    assert app.calls == []
    assert (await strict(inbound(tls=True, peer="a"))).status == 200
    permissive = compose(require_tls(mode="permissive", service="b"), terminal=app)
    assert (await permissive(inbound(tls=False, peer=None))).status == 200


@pytest.mark.parametrize(("mode", "tls", "peer", "source", "status"), [
    ("strict", True, "a", "a", 200),
    ("strict", True, "c", "a", 401),  # a's token from c's workload
    ("strict", True, None, "a", 401),  # a mesh certificate naming nobody
    ("strict", True, "c", "anonymous", 200),  # a public path: no token to pair with
    ("permissive", True, None, "a", 200),  # TLS without a client certificate
    ("permissive", False, None, "a", 200),  # plain text
    ("permissive", True, "c", "a", 401),
])
async def test_the_client_certificate_must_name_the_tokens_issuer(
        mode: str, tls: bool, peer: str | None, source: str, status: int) -> None:
    handler = compose(match_peer(mode=mode, trust_domain=TD), terminal=Next())
    reply = await handler(inbound(tls=tls, peer=peer, source=source))
    assert reply.status == status
    if status == 401:
        assert reply.reason == "peer_identity_mismatch"


async def test_a_spiffe_id_of_another_trust_domain_names_no_service() -> None:
    handler = compose(match_peer(mode="strict", trust_domain=TD), terminal=Next())
    call = inbound(tls=True, peer="a", source="a")
    call.peer_id = "spiffe://elsewhere.test/a"
    assert (await handler(call)).reason == "peer_identity_mismatch"


def mesh_tls(tmp_path: Path) -> MeshTLS:
    ring = CertRing(tmp_path, trust_domain=TD).generate(["a"])
    tls = MeshTLS(TLS(**ring.tls("a")), service="a", trust_domain=TD)
    tls.load()
    return tls


async def test_mesh_attempts_dial_tls_to_the_same_port_and_name_the_far_side(
        tmp_path: Path) -> None:
    tls = mesh_tls(tmp_path)
    app = Next()
    handler = compose(dial_tls(mesh=tls, outside={}), terminal=app)
    call = make_call("/claims", to=target("b", endpoints=("http://b",)))
    await handler(call)
    seen = app.calls[0]
    assert (seen.endpoint, seen.scheme, seen.tls) == ("https://b:80", "https", True)
    assert seen.ssl_context is tls.client and seen.server_name == "b"
    assert seen.peer_id == f"spiffe://{TD}/b"
    # A failed attempt names no peer.
    failing = compose(dial_tls(mesh=tls, outside={}),
                      terminal=Next(UpstreamError("identity-mismatch", sent=False)))
    call = make_call("/claims", to=target("b"))
    with pytest.raises(UpstreamError):
        await failing(call)
    assert call.peer_id is None and call.tls


async def test_outside_services_keep_their_scheme_and_their_own_ca(tmp_path: Path) -> None:
    tls = mesh_tls(tmp_path)
    payer_ca = outside_context(str(tls.settings.ca_file))
    app = Next()
    handler = compose(dial_tls(mesh=tls, outside={"payer": payer_ca}), terminal=app)
    https = make_call("/v1", to=target("payer", mesh=False, endpoints=("https://payer.test",)))
    https.scheme = "https"
    await handler(https)
    plain = make_call("/v1", to=target("legacy", mesh=False, endpoints=("http://legacy",)))
    await handler(plain)
    assert (https.tls, https.ssl_context, https.server_name, https.peer_id) == (
        True, payer_ca, None, None)
    assert (plain.tls, plain.ssl_context, plain.endpoint) == (False, None, "http://legacy")


def test_mesh_urls_keep_their_port() -> None:
    assert mesh_url("http://b:15006") == "https://b:15006"
    assert mesh_url("http://b") == "https://b:80"
    assert mesh_url("http://[::1]:15006") == "https://[::1]:15006"
    assert mesh_url("https://b:8443") == "https://b:8443"


def test_the_client_context_checks_the_spiffe_id_of_the_name_it_dialled(tmp_path: Path) -> None:
    client = mesh_tls(tmp_path).client
    cert = {"subjectAltName": (("DNS", "b"), ("URI", f"spiffe://{TD}/b"))}
    client.check_peer("b", cert)
    with pytest.raises(PeerMismatch):
        client.check_peer("b", {"subjectAltName": (("DNS", "b"), ("URI", f"spiffe://{TD}/c"))})
    with pytest.raises(PeerMismatch):
        client.check_peer("b", {})
    assert peer_ids(cert) == [f"spiffe://{TD}/b"]


async def test_the_server_span_says_mtls_and_names_the_peer() -> None:
    exporter = InMemorySpanExporter()
    plan = plan_export(settings.Tracing(exporter="otlp"), service_name="b", env={})
    tracing = Tracing(plan, exporter)
    handler = compose(server_span(tracing=tracing), terminal=Next())
    call = inbound(tls=True, peer="a", source="a")
    call.scheme = "https"
    await handler(call)
    assert tracing.force_flush()
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["url.scheme"] == "https"
    assert span.attributes["sidecar.peer_id"] == f"spiffe://{TD}/a"
    tracing.shutdown()


async def test_tls_1_2_at_least_and_1_3_when_both_speak_it(tmp_path: Path) -> None:
    ring = CertRing(tmp_path, trust_domain=TD).generate(["a", "b"])
    server_side = MeshTLS(TLS(**ring.tls("b")), service="b", trust_domain=TD)
    server_side.load()
    assert server_side.server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_side.server.verify_mode == ssl.CERT_REQUIRED  # strict

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=server_side.server)
    port = server.sockets[0].getsockname()[1]
    try:
        versions = []
        for highest in (None, ssl.TLSVersion.TLSv1_2):
            client = client_context(TLS(**ring.tls("a")), TD)
            if highest is not None:
                client.maximum_version = highest
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                      server_hostname="b")
            versions.append(writer.get_extra_info("ssl_object").version())
            writer.close()
        assert versions == ["TLSv1.3", "TLSv1.2"]
    finally:
        server.close()
