"""Mutual TLS between real sidecar processes: strict, permissive, and who may present what.

Every handshake here is a real one, on loopback, with certificates from
`sidecar certs`; a TCP relay between two sidecars shows what is on the wire.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from deploy.process import CertRing, SidecarProcess, free_port
from sidecar.config.settings import TLS
from sidecar.http import transport
from sidecar.stack import UpstreamError
from sidecar.tls.contexts import client_context
from tests.support import tls
from tests.support.audit import wait_for_audit
from tests.support.calls import make_call, target
from tests.support.faults import FaultProxy
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(90)


async def strict_pair(make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream],
                      services: list[str] | None = None, **b_config: object,
                      ) -> tuple[Mesh, SidecarProcess, SidecarProcess, Upstream, FaultProxy]:
    """a -> relay -> b, both strict; the relay records the bytes each connection began with."""
    mesh = make_mesh(services or ["a", "b"], tls="strict")
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url, **b_config}).start()
    relay = await FaultProxy(b.inbound).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [relay.url],
                                                "retry": {"attempts": 1}}}).start()
    return mesh, a, b, app_b, relay


async def test_strict_calls_go_over_mtls_from_the_first_byte_and_share_one_connection(
        make_mesh, upstreams):
    mesh, a, b, app_b, relay = await strict_pair(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        for n in range(5):
            async with session.get(f"{a.outbound_url}/b/claims/{n}") as response:
                assert response.status == 200
                assert (await response.json())["source"] == "a"
    assert app_b.paths() == [f"/claims/{n}" for n in range(5)]
    # On the wire: a ClientHello first, and one handshake for all five calls.
    assert relay.connections == 1
    assert all(tls.is_client_hello(first) for first in relay.first_bytes)
    assert b"claims" not in b"".join(relay.first_bytes)
    td = mesh.certs.trust_domain
    inbound = (await wait_for_audit(b, 5))[0]
    assert inbound["tls"] is True and inbound["peer_id"] == f"spiffe://{td}/a"
    outbound = (await wait_for_audit(a, 5))[0]
    assert outbound["tls"] is True and outbound["peer_id"] == f"spiffe://{td}/b"
    # Neither certificate contents nor request data in the records.
    assert "BEGIN CERTIFICATE" not in b.audit_path.read_text()


async def test_strict_refuses_every_caller_without_the_right_certificate(
        make_mesh, upstreams, tmp_path: Path):
    mesh, _a, b, app_b, _relay = await strict_pair(make_mesh, upstreams, ["a", "b", "c"])
    ring, td = mesh.certs, mesh.certs.trust_domain
    assert ring is not None
    token_a = tls.token(mesh.keyring, "a", "b", td)
    url = f"https://127.0.0.1:{b.inbound}/claims/1"

    # Plain text: 400 tls_required, in plain text, before the token is looked at.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{b.inbound_url}/claims/1",
                               headers={"x-service-token": token_a}) as response:
            assert response.status == 400
            assert response.headers["x-sidecar-reason"] == "tls_required"
            assert (await response.json(content_type=None))["reason"] == "tls_required"

    # Handshakes that fail: no certificate, self-signed, another CA, expired.
    refused = {
        "no certificate": tls.client_context(ring),
        "self-signed": tls.client_context(ring, *tls.self_signed(tmp_path / "self", "a", td)),
        "another CA": tls.client_context(ring, *tls.foreign(tmp_path / "other", "a", td)),
        "expired": tls.client_context(ring, *tls.expired(ring, tmp_path / "old", "a")),
    }
    for name, context in refused.items():
        with pytest.raises((aiohttp.ClientError, OSError)):
            await tls.tls_get(url, context, "b", {"x-service-token": token_a})
        assert app_b.seen == [], name

    # A good certificate of `c` with a token of `a`: a token copied off another workload.
    context_c = tls.client_context(ring, ring.cert_file("c"), ring.key_file("c"))
    status, body = await tls.tls_get(url, context_c, "b", {"x-service-token": token_a})
    assert (status, body["reason"]) == (401, "peer_identity_mismatch")
    # The same certificate with its own token passes: the check is the pairing.
    status, _ = await tls.tls_get(url, context_c, "b",
                                  {"x-service-token": tls.token(mesh.keyring, "c", "b", td)})
    assert status == 200
    assert app_b.paths() == ["/claims/1"]

    records = await wait_for_audit(b, 7)
    reasons = [(r["reason"], r["tls"], r["peer_id"]) for r in records]
    assert reasons[0] == ("tls_required", False, None)
    assert reasons[1:5] == [("tls_required", False, None)] * 4  # one per failed handshake
    assert reasons[5] == ("peer_identity_mismatch", True, f"spiffe://{td}/c")
    assert reasons[6] == (None, True, f"spiffe://{td}/c")
    assert all(r["decision"] == "denied" for r in records[:6])


async def test_outbound_refuses_a_far_side_whose_certificate_names_another_service(
        make_mesh, upstreams):
    mesh = make_mesh(["a", "b", "c"], tls="strict")
    app_c = await upstreams().start()
    c = await mesh.sidecar("c", inbound={"app": app_c.url}).start()
    # a believes b lives where c does (a stale DNS record, a hijack): c's sidecar answers.
    a = await mesh.sidecar("a", services={"b": {"endpoints": [c.inbound_url],
                                                "retry": {"attempts": 1}}}).start()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{a.outbound_url}/b/claims/1") as response:
            assert response.status == 502
            assert response.headers["x-sidecar-reason"] == "upstream_identity_mismatch"
            body = await response.json(content_type=None)
            assert "nothing was sent" in body["detail"]
    assert app_c.seen == []
    record = (await wait_for_audit(a, 1))[0]
    assert record["reason"] == "upstream_identity_mismatch" and record["tls"] is True
    assert record["peer_id"] is None  # nobody the call was meant for answered


async def test_permissive_takes_tls_and_plain_text_and_records_which(make_mesh, upstreams):
    mesh = make_mesh(["a", "b", "d"], tls="permissive")
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
    # d has not been moved to TLS yet: it calls in plain text.
    d = await mesh.sidecar("d", tls={"mode": "disabled"},
                           services={"b": {"endpoints": [b.inbound_url]}}).start()
    async with aiohttp.ClientSession() as session:
        for caller in (a, d):
            async with session.get(f"{caller.outbound_url}/b/claims/1") as response:
                assert response.status == 200
                assert (await response.json())["source"] == caller.name
    td = mesh.certs.trust_domain
    records = await wait_for_audit(b, 2)
    assert [(r["source"], r["tls"], r["peer_id"]) for r in records] == [
        ("a", True, f"spiffe://{td}/a"), ("d", False, None)]


async def test_a_far_side_with_the_right_host_name_but_another_spiffe_id_gets_nothing(
        tmp_path: Path):
    """The SPIFFE check after the handshake, on its own: the DNS SAN says b, the URI SAN c."""
    ring = CertRing(tmp_path).generate(["a"])
    cert, key = tls.mislabelled(ring, tmp_path / "impostor", "b", "c")
    received: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        received.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ring.ca_file))
    server_side.load_cert_chain(str(cert), str(key))
    site = web.TCPSite(runner, "127.0.0.1", free_port(), ssl_context=server_side)
    await site.start()
    session = transport.new_session()
    try:
        tls_settings = TLS(**ring.tls("a"))
        call = make_call("/claims/1", to=target("b"))
        call.ssl_context = client_context(tls_settings, ring.trust_domain)
        call.server_name = "b"
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        with pytest.raises(UpstreamError) as caught:
            await transport.exchange(session, call, f"https://127.0.0.1:{port}",
                                     connect_timeout=2.0)
        assert caught.value.kind == "identity-mismatch" and caught.value.sent is False
        assert received == []
    finally:
        await session.close()
        await runner.cleanup()


async def test_outside_https_is_checked_against_the_services_own_ca(make_mesh, tmp_path: Path):
    ca, cert, key = tls.loopback_server(tmp_path / "payer")
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"paid": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        mesh = make_mesh(["a"], tls="strict")
        outside = {"endpoints": [f"https://127.0.0.1:{port}"], "mesh": False,
                   "retry": {"attempts": 1}}
        a = await mesh.sidecar("a", services={
            "payer": {**outside, "ca_file": str(ca)},
            "stranger": outside,  # the same server, judged by the system's trust store
        }).start()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{a.outbound_url}/payer/claims/1") as response:
                assert response.status == 200
            async with session.get(f"{a.outbound_url}/stranger/claims/1") as response:
                assert response.status == 502
                assert response.headers["x-sidecar-reason"] == "upstream_identity_mismatch"
        assert len(seen) == 1 and "x-service-token" not in {h.lower() for h in seen[0]}
        records = await wait_for_audit(a, 2)
        assert [(r["target"], r["tls"], r["peer_id"]) for r in records] == [
            ("payer", True, None), ("stranger", True, None)]
    finally:
        await runner.cleanup()


async def test_a_strict_sidecar_drains_open_tls_calls_on_sigterm(make_mesh, upstreams):
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"done": True})

    mesh = make_mesh(["a", "b"], tls="strict")
    app_b = await upstreams(script=slow).start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url],
                                                "retry": {"attempts": 1}}}).start()
    async with aiohttp.ClientSession() as session:
        call = asyncio.ensure_future(session.get(f"{a.outbound_url}/b/claims/1"))
        for _ in range(200):
            if app_b.seen:
                break
            await asyncio.sleep(0.02)
        b.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        gate.set()
        response = await call
        assert response.status == 200 and (await response.json()) == {"done": True}
        response.release()
    assert await b.wait_exit() == 0
