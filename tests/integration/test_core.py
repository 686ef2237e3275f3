"""The core data path through two real sidecar processes and real aiohttp apps."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable

import aiohttp
import pytest

from deploy.process import SidecarProcess
from tests.support.audit import audit_lines, wait_for_audit
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(90)

POLICY = [{"from": ["a"], "methods": ["GET", "POST"], "paths": ["/claims", "/claims/*"]}]


async def two_sidecars(make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream],
                       **b_config: object) -> tuple[SidecarProcess, SidecarProcess, Upstream]:
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams().start()
    b = mesh.sidecar("b", inbound={"app": app_b.url, "public_paths": ["/health"],
                                   "policy": POLICY, **b_config})
    await b.start()
    a = mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url],
                                          "retry": {"attempts": 1}}})
    await a.start()
    return a, b, app_b


async def test_each_addressing_form_reaches_b_with_verified_identity(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        forms = [
            (a.outbound_url + "/b/claims/1", {}),
            (a.outbound_url + "/claims/2", {"Host": "b"}),
        ]
        for url, headers in forms:
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
                assert response.headers["x-sidecar-attempts"] == "1"
        async with session.get("http://b/claims/3", proxy=a.outbound_url) as response:
            assert response.status == 200
        # The app's own spoofed identity and token are dropped; Authorization passes.
        async with session.get(a.outbound_url + "/b/claims/4", headers={
            "x-source-service": "admin", "x-service-token": "forged",
            "Authorization": "Bearer end-user", "x-sidecar-debug": "1",
        }) as response:
            assert response.status == 200
    assert app_b.paths() == ["/claims/1", "/claims/2", "/claims/3", "/claims/4"]
    for seen in app_b.seen:
        assert seen.headers["x-source-service"] == "a"
        assert "x-service-token" not in seen.headers
        assert not any(h.startswith("x-sidecar-") for h in seen.headers)
    assert app_b.seen[3].headers["authorization"] == "Bearer end-user"


async def test_unknown_service_is_no_route_and_dials_nothing(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        for url, headers in [
            (a.outbound_url + "/nowhere/claims", {}),
            (a.outbound_url + "/claims", {"Host": "example.com"}),
        ]:
            async with session.get(url, headers=headers) as response:
                assert response.status == 404
                assert response.headers["x-sidecar-reason"] == "no_route"
                assert response.headers["x-sidecar-attempts"] == "0"
                assert response.content_type == "application/problem+json"
                doc = await response.json(content_type=None)
                assert doc["reason"] == "no_route" and doc["status"] == 404
        # Absolute form naming an unknown host does not fall through to Host.
        async with session.get("http://elsewhere/claims", proxy=a.outbound_url,
                               headers={"Host": "b"}) as response:
            assert response.status == 404
    assert app_b.seen == []


async def test_inbound_without_token_or_with_bad_token_reaches_nothing(make_mesh, upstreams):
    _a, b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.get(b.inbound_url + "/claims/1") as response:
            assert response.status == 401
            assert response.headers["x-sidecar-reason"] == "token_missing"
            doc = await response.json(content_type=None)
            assert set(doc) >= {"type", "title", "status", "detail", "reason"}
        async with session.get(b.inbound_url + "/claims/1",
                               headers={"x-service-token": "not.a.jwt"}) as response:
            assert response.status == 401
            assert response.headers["x-sidecar-reason"] == "token_invalid"
            assert "not.a.jwt" not in await response.text()
        # A public path needs no token.
        async with session.get(b.inbound_url + "/health") as response:
            assert response.status == 200
    assert app_b.paths() == ["/health"]
    assert app_b.seen[0].headers.get("x-source-service") is None


async def test_policy_denial_is_relayed_with_problem_json(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.delete(a.outbound_url + "/b/claims/1") as response:
            assert response.status == 403
            assert response.headers["x-sidecar-reason"] == "policy_denied"
            doc = await response.json(content_type=None)
            assert doc["reason"] == "policy_denied"
        # `..` is resolved before the policy: /claims/../admin is /admin, denied.
        async with session.get(a.outbound_url + "/b/claims/%2e%2e/admin") as response:
            assert response.status == 403
        # An encoded slash is refused outright.
        async with session.get(a.outbound_url + "/b/claims%2F..%2Fadmin") as response:
            assert response.status == 400
            assert response.headers["x-sidecar-reason"] == "bad_request"
        # `//` collapses and the app receives exactly the normalised path.
        async with session.get(a.outbound_url + "/b/claims//7/./lines") as response:
            assert response.status == 200
    assert app_b.paths() == ["/claims/7/lines"]


async def test_audit_lines_on_both_sides_verify(make_mesh, upstreams):
    a, b, _app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/claims/MRN12345678") as response:
            assert response.status == 200
        async with session.post(a.outbound_url + "/b/admin", data=b"x") as response:
            assert response.status == 403
        async with session.get(a.outbound_url + "/zzz/x") as response:
            assert response.status == 404
    await a.stop()
    await b.stop()
    for process in (a, b):
        result = subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify",
                                 str(process.audit_path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    out = audit_lines(a)
    assert [r["status"] for r in out] == [200, 403, 404]
    assert out[0]["source"] == "a" and out[0]["target"] == "b"
    assert out[0]["route"] == "/claims/{id}" and out[0]["decision"] == "allowed"
    assert out[1]["reason"] == "policy_denied" and out[1]["decision"] == "allowed"
    assert out[2]["reason"] == "no_route" and out[2]["decision"] == "denied"
    inbound = audit_lines(b)
    assert [r["direction"] for r in inbound] == ["inbound", "inbound"]
    assert inbound[0]["source"] == "a" and inbound[0]["decision"] == "allowed"
    assert inbound[0]["target"] == "b"
    assert inbound[1]["reason"] == "policy_denied" and inbound[1]["decision"] == "denied"
    assert inbound[0]["trace_id"] == out[0]["trace_id"]
    assert "MRN12345678" not in a.audit_path.read_text() + b.audit_path.read_text()
    # A broken chain is reported with the first bad line.
    lines = b.audit_path.read_text().splitlines()
    lines[0] = lines[0].replace('"status":200', '"status":201')
    b.audit_path.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify",
                             str(b.audit_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "line 1" in result.stdout + result.stderr


async def test_upstream_failures_are_problem_json(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    slow_app = await upstreams().start()

    async def hang(request):
        await asyncio.sleep(30)

    slow_app.script = hang
    from deploy.process import free_port

    dead = free_port()
    a = mesh.sidecar("a", services={
        "slow": {"endpoints": [slow_app.url], "mesh": False, "timeout": "300ms",
                 "retry": {"attempts": 1}},
        "dead": {"endpoints": [f"http://127.0.0.1:{dead}"], "mesh": False,
                 "retry": {"attempts": 1}},
    })
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/slow/x") as response:
            assert response.status == 504
            assert response.headers["x-sidecar-reason"] == "upstream_timeout"
        async with session.get(a.outbound_url + "/dead/x") as response:
            assert response.status == 503
            assert response.headers["x-sidecar-reason"] == "upstream_connect_failure"
            assert response.headers["x-sidecar-attempts"] == "1"


async def test_mesh_false_gets_no_token_and_hop_by_hop_headers_go(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    outside = await upstreams().start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False}})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/payer/eligibility", headers={
            "Connection": "keep-alive, x-private", "x-private": "secret", "TE": "trailers",
        }) as response:
            assert response.status == 200
    seen = outside.seen[0].headers
    assert "x-service-token" not in seen
    assert "x-private" not in seen and "te" not in seen


async def test_limits_answer_431_and_413(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    outside = await upstreams().start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False}},
                     limits={"max_header_line": "1KiB", "max_headers": 20,
                             "max_request_body": "1KiB"})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/payer/x",
                               headers={"x-big": "v" * 2048}) as response:
            assert response.status == 431
            assert response.headers["x-sidecar-reason"] == "headers_too_large"
    async with aiohttp.ClientSession() as session:
        many = {f"x-h{i}": "1" for i in range(30)}
        async with session.get(a.outbound_url + "/payer/x", headers=many) as response:
            assert response.status == 431
    async with aiohttp.ClientSession() as session:
        async with session.post(a.outbound_url + "/payer/x", data=b"x" * 4096) as response:
            assert response.status == 413
            assert response.headers["x-sidecar-reason"] == "body_too_large"

        async def chunks():
            for _ in range(8):
                yield b"y" * 512

        async with session.post(a.outbound_url + "/payer/x", data=chunks()) as response:
            assert response.status == 413
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/payer/ok") as response:
            assert response.status == 200
    assert [s.path for s in outside.seen if s.body] == []
    # Refusals made while parsing are decisions too: audited and counted.
    records = await wait_for_audit(a, 5)
    assert [(r["status"], r["reason"], r["decision"]) for r in records] == [
        (431, "headers_too_large", "denied"), (431, "headers_too_large", "denied"),
        (413, "body_too_large", "denied"), (413, "body_too_large", "denied"),
        (200, None, "allowed"),
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(a.admin_url + "/metrics") as response:
            text = await response.text()
    assert 'code="431"' in text and 'reason="headers_too_large"' in text


async def test_slow_headers_are_cut_off(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    a = mesh.sidecar("a", limits={"header_timeout": "300ms"})
    await a.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", a.outbound)
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    await writer.drain()
    # The sidecar closes the connection; read returns EOF (bounded by the test timeout).
    data = await asyncio.wait_for(reader.read(), timeout=20)
    assert data == b""
    writer.close()


async def test_sigterm_drains_calls_in_flight(make_mesh, upstreams):
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams().start()

    async def slow_answer(request):
        await asyncio.sleep(1.0)
        from aiohttp import web

        return web.json_response({"done": True})

    app_b.script = slow_answer
    b = mesh.sidecar("b", inbound={"app": app_b.url})
    await b.start()
    a = mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> int:
            async with session.get(a.outbound_url + f"/b/claims/{i}") as response:
                await response.read()
                return response.status

        calls = [asyncio.ensure_future(one(i)) for i in range(6)]
        for _ in range(100):
            if len(app_b.seen) == 6:
                break
            await asyncio.sleep(0.02)
        assert len(app_b.seen) == 6
        b.signal(signal.SIGTERM)
        a.signal(signal.SIGTERM)
        statuses = await asyncio.gather(*calls)
    assert statuses == [200] * 6
    assert await b.wait_exit() == 0
    assert await a.wait_exit() == 0
    # Once drained, b takes no new inbound calls.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(b.inbound_url + "/health"):
                pass


async def test_sighup_swaps_the_policy(make_mesh, upstreams):
    a, b, _app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/claims/1") as response:
            assert response.status == 200
        b.config["inbound"]["policy"] = [{"from": ["a"], "paths": ["/reports/*"]}]
        b.write_config()
        b.signal(signal.SIGHUP)
        status = 200
        for _ in range(100):
            async with session.get(a.outbound_url + "/b/claims/1") as response:
                status = response.status
            if status == 403:
                break
            await asyncio.sleep(0.05)
        assert status == 403
        async with session.get(a.outbound_url + "/b/reports/1") as response:
            assert response.status == 200
        # An invalid config is refused and the current one stays.
        b.config_path.write_text("service: b\nidentity: {algorithm: nope}\n")
        b.signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        async with session.get(a.outbound_url + "/b/reports/2") as response:
            assert response.status == 200
        assert "config reload refused" in b.logs()


async def test_admin_health_ready_and_redacted_config(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    app = await upstreams().start()
    from aiohttp import web

    healthy = {"ok": True}

    async def health(request):
        return web.json_response({}, status=200 if healthy["ok"] else 500)

    app.script = health
    a = mesh.sidecar("a", inbound={"app": app.url, "app_health_path": "/health"})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.admin_url + "/healthz") as response:
            assert await response.json() == {"status": "ok"}
        async with session.get(a.admin_url + "/readyz") as response:
            assert response.status == 200 and await response.json() == {"ready": True}
        healthy["ok"] = False
        async with session.get(a.admin_url + "/readyz") as response:
            assert response.status == 503
            doc = await response.json()
            assert doc["ready"] is False and doc["reasons"]
        async with session.get(a.admin_url + "/admin/config") as response:
            doc = await response.json()
            assert doc["service"] == "a"
            assert doc["identity"]["private_key_file"] == "[redacted]"
            assert "PRIVATE KEY" not in json.dumps(doc)
