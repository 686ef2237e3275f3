"""SPEC details at the edges of the data path, through real sidecar processes."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from tests.integration.test_core import POLICY, two_sidecars, wait_for_audit

pytestmark = pytest.mark.timeout(90)


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=20)
    writer.close()
    return data


async def test_the_app_gets_the_path_and_query_exactly_as_the_policy_saw_them(
    make_mesh, upstreams
):
    a, _b, _app_b = await two_sidecars(make_mesh, upstreams)
    reply = await raw(a.outbound, b"GET /b/claims/a%3Ab%7E?r=%2F&s=%7e HTTP/1.1\r\n"
                                  b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    # %7E is unreserved and decoded by the normalisation; %3A is kept as sent.
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/claims/a%3Ab~?r=%2F&s=%7e"


async def test_dotdot_above_the_root_is_refused_even_through_the_outbound_path(
    make_mesh, upstreams
):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    reply = await raw(a.outbound, b"GET /b/claims/%2e%2e/%2e%2e/x HTTP/1.1\r\n"
                                  b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"x-sidecar-reason: bad_request" in reply
    assert app_b.seen == []


async def test_public_paths_are_public_to_mesh_callers_too(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/health") as response:
            assert response.status == 200
    assert app_b.paths() == ["/health"]


async def test_connect_and_asterisk_form_are_bad_requests_with_attempts_zero(
    make_mesh, upstreams
):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    for request in (b"CONNECT b:80 HTTP/1.1\r\nHost: b:80\r\n\r\n",
                    b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n"):
        reply = await raw(a.outbound, request)
        assert reply.split(b"\r\n")[0].split(b" ")[1] == b"400", reply[:200]
        assert b"x-sidecar-reason: bad_request" in reply
        assert b"x-sidecar-attempts: 0" in reply
    assert app_b.seen == []


async def test_answers_made_while_parsing_carry_attempts_zero(make_mesh, upstreams):
    a, _b, _app_b = await two_sidecars(make_mesh, upstreams)
    reply = await raw(a.outbound, b"POST /b/claims HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.0 400")
    assert b"x-sidecar-attempts: 0" in reply
    assert b"application/problem+json" in reply


async def test_a_header_line_is_measured_whole(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    outside = await upstreams().start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False}},
                     limits={"max_header_line": "1KiB"})
    await a.start()
    async with aiohttp.ClientSession() as session:
        # "x-a: " + 1020 bytes = 1025 bytes: one over the limit.
        async with session.get(a.outbound_url + "/payer/x",
                               headers={"x-a": "v" * 1020}) as response:
            assert response.status == 431
        async with session.get(a.outbound_url + "/payer/x",
                               headers={"x-a": "v" * 1019}) as response:
            assert response.status == 200
    assert len(outside.seen) == 1


async def test_the_app_never_names_its_caller_to_outside_services(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    outside = await upstreams().start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False}})
    await a.start()
    reply = await raw(a.outbound, b"GET /payer/x HTTP/1.1\r\nHost: localhost\r\n"
                                  b"x-source-service: admin\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    seen = outside.seen[0].headers
    assert "x-source-service" not in seen
    # Nor does the sidecar add headers of its own.
    assert not {"accept", "accept-encoding", "user-agent"} & set(seen)


async def test_inbound_records_one_attempt_and_ignores_a_zero_deadline(make_mesh, upstreams):
    a, b, _app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/claims/1",
                               headers={"x-sidecar-timeout-ms": "0"}) as response:
            assert response.status == 200
    records = await wait_for_audit(b, 1)
    assert records[0]["attempts"] == 1 and records[0]["status"] == 200


async def test_breaker_gauge_turns_half_open_without_traffic(make_mesh, upstreams):
    from deploy.process import free_port

    mesh = make_mesh(["a"])
    a = mesh.sidecar("a", services={"dead": {
        "endpoints": [f"http://127.0.0.1:{free_port()}"], "mesh": False,
        "retry": {"attempts": 1},
        "circuit_breaker": {"failure_threshold": 1, "recovery_timeout": "300ms"},
    }})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/dead/x") as response:
            assert response.status == 503
        state = ""
        for _ in range(100):
            async with session.get(a.admin_url + "/metrics") as response:
                text = await response.text()
            if 'sidecar_circuit_state{peer="dead",state="half-open"} 1.0' in text:
                state = "half-open"
                break
            await asyncio.sleep(0.05)
    assert state == "half-open"


async def test_reload_keeps_restart_only_settings_and_says_so(make_mesh, upstreams):
    a, b, _app_b = await two_sidecars(make_mesh, upstreams)
    b.config["limits"] = {"max_headers": 5}
    b.config["inbound"]["policy"] = [*POLICY, {"from": ["a"], "paths": ["/reports/*"]}]
    b.write_config()
    b.signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as session:
        status = 0
        for _ in range(100):
            async with session.get(a.outbound_url + "/b/reports/1") as response:
                status = response.status
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        many = {f"x-h{i}": "1" for i in range(10)}
        async with session.get(a.outbound_url + "/b/claims/1", headers=many) as response:
            assert response.status == 200
        async with session.get(b.admin_url + "/admin/config") as response:
            assert (await response.json())["limits"]["max_headers"] == 100
    assert "apply after a restart" in b.logs()


async def test_sighup_reopens_a_rotated_audit_file(make_mesh, upstreams):
    import subprocess
    import sys

    a, b, _app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/claims/1") as response:
            assert response.status == 200
        await wait_for_audit(b, 1)
        rotated = b.audit_path.with_suffix(".1")
        b.audit_path.rename(rotated)
        b.signal(signal.SIGHUP)
        for _ in range(100):
            async with session.get(a.outbound_url + "/b/claims/2") as response:
                assert response.status == 200
            if b.audit_path.exists():
                break
            await asyncio.sleep(0.05)
    await b.stop()
    for path in (rotated, b.audit_path):
        result = subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify", str(path)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    first = json.loads(b.audit_path.read_text().splitlines()[0])
    assert first["prev_hash"] == "0" * 64


async def test_head_answers_carry_no_body_and_leave_the_connection_usable(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.head(a.outbound_url + "/b/denied") as response:
                assert response.status == 403
                assert response.headers["x-sidecar-attempts"] == "1"
            async with session.post(a.outbound_url + "/b/claims/1", data=b"x") as response:
                assert response.status == 200
                assert response.headers["x-sidecar-attempts"] == "1"
    reply = await raw(a.outbound, b"HEAD /nowhere/x HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Connection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and body == b""
    assert app_b.paths() == ["/claims/1"] * 3


async def test_expect_100_continue_uploads_go_through(make_mesh, upstreams):
    a, _b, app_b = await two_sidecars(make_mesh, upstreams)
    async with aiohttp.ClientSession() as session:
        async with session.post(a.outbound_url + "/b/claims/1", data=b"y" * 200_000,
                                expect100=True) as response:
            assert response.status == 200
            assert response.headers["x-sidecar-attempts"] == "1"
    assert len(app_b.seen[0].body) == 200_000
    assert "expect" not in app_b.seen[0].headers


async def test_a_body_over_the_limit_mid_stream_is_413_and_no_upstream_failure(
    make_mesh, upstreams
):
    mesh = make_mesh(["a"])
    outside = await upstreams().start()
    a = mesh.sidecar("a", services={"payer": {
        "endpoints": [outside.url], "mesh": False,
        "circuit_breaker": {"failure_threshold": 1},
    }}, limits={"max_request_body": "64KiB"})
    await a.start()

    async def chunks():
        for _ in range(64):
            yield b"z" * 4096

    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(a.outbound_url + "/payer/x", data=chunks()) as response:
                assert response.status == 413
                assert response.headers["x-sidecar-reason"] == "body_too_large"
        # The client's oversized body is not the upstream's failure: the breaker stays closed.
        async with session.get(a.outbound_url + "/payer/ok") as response:
            assert response.status == 200
    records = await wait_for_audit(a, 3)
    assert [r["status"] for r in records] == [413, 413, 200]


async def test_long_response_header_lines_pass(make_mesh, upstreams):
    from aiohttp import web

    mesh = make_mesh(["a"])

    async def big_header(request):
        return web.json_response({}, headers={"x-policy": "p" * 16000})

    outside = await upstreams(script=big_header).start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False}})
    await a.start()
    async with aiohttp.ClientSession(max_field_size=32_000) as session:
        async with session.get(a.outbound_url + "/payer/x") as response:
            assert response.status == 200
            assert len(response.headers["x-policy"]) == 16000
            assert response.headers["x-sidecar-attempts"] == "1"
    assert len(outside.seen) == 1


async def test_drain_timeout_bounds_the_exit_even_with_a_stream_in_flight(
    make_mesh, upstreams
):
    from aiohttp import web

    mesh = make_mesh(["a"])

    async def endless(request):
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(200):
            await response.write(b"." * 100)
            await asyncio.sleep(0.1)
        return response

    outside = await upstreams(script=endless).start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False,
                                              "timeout": "60s"}},
                     drain_timeout="1s")
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/payer/stream") as response:
            assert response.status == 200
            await response.content.read(100)
            a.signal(signal.SIGTERM)
            # The stream takes 20 s; the sidecar leaves after its 1 s drain.
            assert await a.wait_exit(timeout=10) == 0


async def test_a_chunked_body_that_breaks_mid_stream_is_a_bad_request(make_mesh, upstreams):
    a, _b, _app_b = await two_sidecars(make_mesh, upstreams)
    chunk = b"x" * 65536
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 4 + b"zz-not-a-size\r\n\r\n"
    reply = await raw(a.outbound, b"POST /b/claims/1 HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert reply.split(b"\r\n")[0].split(b" ")[1] == b"400"
    assert b"x-sidecar-reason: bad_request" in reply
    # The client's broken body is no failure of b's: the next call goes through.
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/b/claims/2") as response:
            assert response.status == 200


async def test_a_slow_upload_is_not_timed_but_a_slow_answer_after_it_is(make_mesh, upstreams):
    from aiohttp import web

    mesh = make_mesh(["a", "b"])

    async def answer(request):
        body = await request.read()
        if request.path == "/slow":
            await asyncio.sleep(5)
        return web.json_response({"received": len(body)})

    app_b = await upstreams(script=answer).start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url},
                           defaults={"timeout": "1s"}).start()
    a = await mesh.sidecar("a", services={"b": {
        "endpoints": [b.inbound_url], "timeout": "1s",
        "retry": {"attempts": 1, "per_try_timeout": "500ms"},
    }}).start()

    async def trickle():
        for _ in range(8):  # about 2 s of upload, longer than every timeout
            yield b"u" * 100_000
            await asyncio.sleep(0.25)

    async with aiohttp.ClientSession() as session:
        async with session.put(a.outbound_url + "/b/upload", data=trickle()) as response:
            assert response.status == 200
            assert (await response.json())["received"] == 800_000
        async with session.put(a.outbound_url + "/b/slow", data=trickle()) as response:
            assert response.status == 504
            assert response.headers["x-sidecar-reason"] == "upstream_timeout"


async def test_a_stream_that_stalls_past_idle_timeout_is_cut_but_a_slow_one_is_not(
    make_mesh, upstreams
):
    from aiohttp import web

    mesh = make_mesh(["a"])

    async def stream(request):
        response = web.StreamResponse()
        await response.prepare(request)
        pause = 3.0 if request.path == "/stall" else 0.1
        for _ in range(10):
            await response.write(b"." * 100)
            await asyncio.sleep(pause if request.path == "/stall" else 0.1)
        return response

    outside = await upstreams(script=stream).start()
    a = mesh.sidecar("a", services={"payer": {"endpoints": [outside.url], "mesh": False,
                                              "timeout": "60s"}},
                     limits={"idle_timeout": "600ms"})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.outbound_url + "/payer/steady") as response:
            assert len(await response.read()) == 1000
        async with session.get(a.outbound_url + "/payer/stall") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
