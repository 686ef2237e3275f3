"""Retries, budgets, timeouts, resets and deadlines through real sidecar processes.

Sidecar A calls apps outside the mesh (no token) directly or through a TCP
`FaultProxy`; where the far sidecar matters, a real sidecar B sits in front
of the app. Upstreams count what reached them; nothing is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from deploy.process import SidecarProcess
from sidecar.identity import keys
from sidecar.identity.tokens import Minter
from tests.integration.resilience_support import (
    QUICK_BACKOFF,
    Plan,
    direct,
    metric,
    problem_of,
    start_a,
    wait_until,
)
from tests.support.audit import audit_lines
from tests.support.faults import FaultProxy
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(30)

# Retries on, breaker out of the way: these tests watch the retry layer alone.
RETRYING = {"attempts": 3, "backoff": QUICK_BACKOFF}
NO_BREAKER = {"failure_threshold": 1000}


async def faulted(upstream: Upstream, mode: str) -> FaultProxy:
    proxy = await FaultProxy(upstream.port).start()
    await proxy.set_mode(mode)
    return proxy


async def test_503_twice_then_200_retries_get_and_keyed_post_but_not_plain_post(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    plan = Plan()
    app = await upstreams(script=plan).start()
    a = await start_a(make_mesh, flaky=direct(app.url, retry=RETRYING, circuit_breaker=NO_BREAKER))
    url = a.outbound_url + "/flaky/claims"
    async with aiohttp.ClientSession() as session:
        plan.reset(503, 503)
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["x-sidecar-attempts"] == "3"
            assert "x-sidecar-reason" not in response.headers
        assert [s.method for s in app.seen] == ["GET"] * 3

        # A POST could act twice: the 503 goes back after one attempt.
        app.seen.clear()
        plan.reset(503, 503)
        async with session.post(url, data=b'{"claim": 1}') as response:
            assert response.status == 503
            assert response.headers["x-sidecar-attempts"] == "1"
            assert "x-sidecar-reason" not in response.headers  # the app's 503, as it came
        assert len(app.seen) == 1

        # With an Idempotency-Key the app can recognise a repeat: retried, same body each time.
        app.seen.clear()
        plan.reset(503, 503)
        async with session.post(
            url, data=b'{"claim": 2}', headers={"Idempotency-Key": "k-2"}
        ) as response:
            assert response.status == 200
            assert response.headers["x-sidecar-attempts"] == "3"
        assert [(s.method, s.body) for s in app.seen] == [("POST", b'{"claim": 2}')] * 3
        assert {s.headers["idempotency-key"] for s in app.seen} == {"k-2"}

    assert await metric(a, "sidecar_retries_total", peer="flaky") == 4


async def test_post_to_refused_port_is_retried_and_lands_once_it_is_back(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    app = await upstreams().start()
    proxy = await faulted(app, "refuse")
    try:
        a = await start_a(
            make_mesh, down=direct(proxy.url, retry=RETRYING, circuit_breaker=NO_BREAKER)
        )
        url = a.outbound_url + "/down/claims"
        async with aiohttp.ClientSession() as session:
            # Nothing was sent, so even a POST without a key may go again: every attempt used.
            async with session.post(url, data=b"claim") as response:
                assert response.status == 503
                assert response.headers["x-sidecar-attempts"] == "3"
                doc = await problem_of(response)
                assert doc["reason"] == "upstream_connect_failure"
            assert app.seen == []
            await proxy.set_mode("pass")
            async with session.post(url, data=b"claim") as response:
                assert response.status == 200
                assert response.headers["x-sidecar-attempts"] == "1"
        assert [(s.method, s.body) for s in app.seen] == [("POST", b"claim")]
    finally:
        await proxy.stop()


async def test_5xx_storm_is_held_to_the_retry_budget(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    requests = 200
    app = await upstreams(script=Plan(then=503)).start()
    # The floor is 0.5/s * 20 s = 10 retries; the ratio adds 0.2 per request in the
    # window. The window outlasts the storm, so nothing leaves it while we count.
    budget = {"min_per_second": 0.5, "window": "20s", "ratio": 0.2}
    a = await start_a(
        make_mesh,
        storm=direct(app.url, retry={**RETRYING, "budget": budget}, circuit_breaker=NO_BREAKER),
    )
    attempts = 0
    async with aiohttp.ClientSession() as session:
        for i in range(requests):
            async with session.get(a.outbound_url + f"/storm/claims/{i}") as response:
                assert response.status == 503
                await response.read()
                attempts += int(response.headers["x-sidecar-attempts"])
    allowed_retries = min(2 * requests, int(0.5 * 20 + 0.2 * requests))
    assert allowed_retries == 50
    # Without the budget every request would take 3 attempts: 600.
    assert len(app.seen) == attempts == requests + allowed_retries
    assert await metric(a, "sidecar_retries_total", peer="storm") == allowed_retries


async def test_blackholed_upstream_answers_504_within_the_timeout_after_every_attempt(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    app = await upstreams().start()
    proxy = await faulted(app, "blackhole")
    try:
        a = await start_a(
            make_mesh,
            hole=direct(
                proxy.url,
                timeout="600ms",
                retry={**RETRYING, "per_try_timeout": "200ms"},
                circuit_breaker=NO_BREAKER,
            ),
        )
        url = a.outbound_url + "/hole/claims"
        # The client waits far longer than the sidecar's timeout: the 504 is the sidecar's.
        client_timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            async with session.get(url) as response:
                assert response.status == 504
                assert response.headers["x-sidecar-attempts"] == "3"
                doc = await problem_of(response)
                assert doc["reason"] == "upstream_timeout"
            assert proxy.connections == 3  # each attempt on a fresh connection
            # A POST that may have been received is not sent again.
            async with session.post(url, data=b"claim") as response:
                assert response.status == 504
                assert response.headers["x-sidecar-attempts"] == "1"
                assert response.headers["x-sidecar-reason"] == "upstream_timeout"
            assert proxy.connections == 4
        assert app.seen == []
    finally:
        await proxy.stop()


async def big_answer(request: web.Request) -> web.StreamResponse:
    """200 with a 256 KiB body, framed by Content-Length or chunked as the path says."""
    body = b"x" * (256 * 1024)
    if request.path.endswith("/chunked"):
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 16 * 1024):
            await response.write(body[start : start + 16 * 1024])
        await response.write_eof()
        return response
    return web.Response(body=body, content_type="application/octet-stream")


async def test_reset_mid_body_aborts_the_apps_connection(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    app = await upstreams(script=big_answer).start()
    proxy = await faulted(app, "reset_mid_body")
    try:
        a = await start_a(
            make_mesh, cut=direct(proxy.url, retry=RETRYING, circuit_breaker=NO_BREAKER)
        )
        for framing in ("length", "chunked"):
            async with aiohttp.ClientSession() as session:
                async with session.get(a.outbound_url + f"/cut/file/{framing}") as response:
                    # The head had already gone out when the upstream broke off...
                    assert response.status == 200
                    assert response.headers["x-sidecar-attempts"] == "1"
                    # ...so the app must see a broken body, never a complete-looking one.
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await response.read()
        assert len(app.seen) == 2  # a response that began is never retried
    finally:
        await proxy.stop()


async def test_reset_mid_body_behind_a_far_sidecar_reaches_the_app_as_a_cut(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams(script=big_answer).start()
    proxy = await faulted(app_b, "reset_mid_body")
    try:
        b = await mesh.sidecar("b", inbound={"app": proxy.url}).start()
        a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
        async with aiohttp.ClientSession() as session:
            async with session.get(a.outbound_url + "/b/file/length") as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        assert len(app_b.seen) == 1
    finally:
        await proxy.stop()


async def test_reset_before_response_is_502_after_retries_for_get_and_at_once_for_post(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    app = await upstreams().start()
    proxy = await faulted(app, "reset_before_response")
    try:
        a = await start_a(
            make_mesh, rst=direct(proxy.url, retry=RETRYING, circuit_breaker=NO_BREAKER)
        )
        url = a.outbound_url + "/rst/claims"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 502
                assert response.headers["x-sidecar-attempts"] == "3"
                doc = await problem_of(response)
                assert doc["reason"] == "upstream_reset"
            assert proxy.connections == 3
            # The POST's bytes went out before the reset: the upstream may have acted.
            async with session.post(url, data=b"claim") as response:
                assert response.status == 502
                assert response.headers["x-sidecar-attempts"] == "1"
                assert response.headers["x-sidecar-reason"] == "upstream_reset"
            assert proxy.connections == 4
        assert app.seen == []
    finally:
        await proxy.stop()


async def test_upstream_closing_an_idle_keep_alive_connection_costs_no_attempt(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    app = await upstreams().start()
    proxy = await faulted(app, "close_idle")
    try:
        a = await start_a(make_mesh, idle=direct(proxy.url, retry=RETRYING))
        url = a.outbound_url + "/idle/claims"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 200

            async def idle_connection_closed() -> bool:
                return not proxy._clients  # the proxy keeps no public count of live ones

            await wait_until(idle_connection_closed, "the proxy to close the idle connection")
            # The pooled connection is gone: a fresh one is used, not a failed attempt.
            for method in ("GET", "POST"):
                async with session.request(method, url, data=b"x") as response:
                    assert response.status == 200
                    assert response.headers["x-sidecar-attempts"] == "1"
                await wait_until(idle_connection_closed, "the next idle close")
        assert proxy.connections == 3
        assert [s.method for s in app.seen] == ["GET", "GET", "POST"]
        assert await metric(a, "sidecar_retries_total", peer="idle") == 0
    finally:
        await proxy.stop()


async def test_app_deadline_header_shortens_but_never_lengthens_the_timeout(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    async def answer_in_a_second(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.json_response({"late": True})

    app = await upstreams(script=answer_in_a_second).start()
    once = {"attempts": 1}
    a = await start_a(
        make_mesh,
        roomy=direct(app.url, timeout="10s", retry=once),
        tight=direct(app.url, timeout="300ms", retry=once),
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(
            a.outbound_url + "/roomy/claims", headers={"x-sidecar-timeout-ms": "200"}
        ) as response:
            assert response.status == 504
            doc = await problem_of(response)
            assert doc["reason"] == "upstream_timeout"
            assert "x-sidecar-timeout-ms" in doc["detail"]
        async with session.get(
            a.outbound_url + "/tight/claims", headers={"x-sidecar-timeout-ms": "60000"}
        ) as response:
            assert response.status == 504
            assert response.headers["x-sidecar-reason"] == "upstream_timeout"
        # The same upstream does answer when given the time.
        async with session.get(a.outbound_url + "/roomy/claims") as response:
            assert response.status == 200
    # Services outside the mesh never see the deadline header.
    assert len(app.seen) == 3
    assert not any("x-sidecar-timeout-ms" in s.headers for s in app.seen)


async def test_deadline_travels_to_the_far_sidecar_which_holds_its_app_call_to_it(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    mesh = make_mesh(["a", "b"])

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3.0)
        return web.json_response({"late": True})

    app_b = await upstreams(script=slow).start()
    # A stand-in for a far sidecar that shows what A sends it.
    far = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url}).start()
    once = {"attempts": 1, "per_try_timeout": "2s"}
    a = await mesh.sidecar(
        "a",
        services={
            "b": {"endpoints": [b.inbound_url], "timeout": "10s", "retry": once},
            "far": {"endpoints": [far.url], "timeout": "10s", "retry": once},
        },
    ).start()
    async with aiohttp.ClientSession() as session:
        # A sends the far side the time left of the call (not the 2 s per-try
        # bound, which only this side's wait for the answer to begin keeps)...
        async with session.get(a.outbound_url + "/far/claims") as response:
            assert response.status == 200
        # ...or what is left of the time the app allowed, when that is less.
        async with session.get(
            a.outbound_url + "/far/claims", headers={"x-sidecar-timeout-ms": "800"}
        ) as response:
            assert response.status == 200
        sent = [s.headers["x-sidecar-timeout-ms"] for s in far.seen]
        # (50 ms less, so the far side's own answer arrives first).
        assert 9000 < int(sent[0]) <= 9950
        assert 1 <= int(sent[1]) <= 750

        # B holds its app call to the header: its own timeout is 10 s and its app
        # answers after 3 s, so only the header can make B answer 504 itself.
        ring = mesh.keyring
        key = keys.load_private_key(ring.private_key("a"), ring.algorithm)
        token = Minter(service="a", algorithm=ring.algorithm, key=key, ttl=60).token_for("b")
        async with session.get(
            b.inbound_url + "/claims",
            headers={
                "x-service-token": token,
                "x-sidecar-timeout-ms": "300",
            },
        ) as response:
            assert response.status == 504
            assert (await problem_of(response))["reason"] == "upstream_timeout"
        assert len(app_b.seen) == 1
        assert "x-sidecar-timeout-ms" not in app_b.seen[0].headers
        await wait_until(lambda: _has_records(b, 1), "b's audit line")
        audit = audit_lines(b)
        assert [(r["status"], r["reason"]) for r in audit] == [(504, "upstream_timeout")]

        # End to end: the app's deadline bounds the whole chain A -> B -> B's app.
        async with session.get(
            a.outbound_url + "/b/claims", headers={"x-sidecar-timeout-ms": "500"}
        ) as response:
            assert response.status == 504
            assert response.headers["x-sidecar-attempts"] == "1"
            problem = await problem_of(response)
            assert problem["reason"] == "upstream_timeout"
            # B gave up first, and its answer (about its app) is what A relayed.
            assert problem["detail"].startswith("the app did not answer")
        assert len(app_b.seen) == 2
        await wait_until(lambda: _has_records(b, 2), "b's second audit line")


async def _has_records(process: SidecarProcess, count: int) -> bool:
    return len(audit_lines(process)) >= count
