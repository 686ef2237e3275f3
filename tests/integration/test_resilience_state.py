"""Breaker, bulkhead, outlier ejection and health checks through a real sidecar process.

Each test drives sidecar A against apps outside the mesh and reads the state
back from the admin port (`/admin/services`, `/metrics`). Calls are held in
flight with gates the test opens, never with sleeps; state changes are waited
for with bounded polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from tests.integration.resilience_support import (
    Plan,
    breaker_state,
    circuit_gauges,
    direct,
    endpoint_state,
    metric,
    problem_of,
    services_state,
    start_a,
    wait_until,
)
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(30)

ONCE = {"attempts": 1}


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    async with session.get(url) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_breaker_opens_probes_once_closes_and_reopens(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    plan = Plan(then=503)
    app = await upstreams(script=plan).start()
    a = await start_a(
        make_mesh,
        flaky=direct(
            app.url,
            retry=ONCE,
            circuit_breaker={
                "failure_threshold": 3,
                "recovery_timeout": "1s",
                "half_open_max_calls": 1,
            },
        ),
    )
    url = a.outbound_url + "/flaky/claims"

    async def is_half_open() -> bool:
        return await breaker_state(a, "flaky") == "half-open"

    async def refused_while_open(session: aiohttp.ClientSession) -> None:
        before = len(app.seen)
        async with session.get(url) as response:
            assert response.status == 503
            assert response.headers["x-sidecar-attempts"] == "0"
            assert int(response.headers["Retry-After"]) >= 1
            assert (await problem_of(response))["reason"] == "circuit_open"
        assert len(app.seen) == before  # nothing reached the upstream

    async with aiohttp.ClientSession() as session:
        assert await breaker_state(a, "flaky") == "closed"
        assert await circuit_gauges(a, "flaky") == {"closed": 1, "open": 0, "half-open": 0}
        for _ in range(3):
            status, headers = await get(session, url)
            assert (status, headers.get("x-sidecar-reason")) == (503, None)  # the app's own
        assert await breaker_state(a, "flaky") == "open"
        assert await circuit_gauges(a, "flaky") == {"closed": 0, "open": 1, "half-open": 0}
        await refused_while_open(session)
        assert len(app.seen) == 3

        # After recovery_timeout one probe goes through; a second caller is refused meanwhile.
        await wait_until(is_half_open, "the breaker to turn half-open")
        assert await circuit_gauges(a, "flaky") == {"closed": 0, "open": 0, "half-open": 1}
        plan.gate = asyncio.Event()
        plan.reset(then=200)
        probe = asyncio.ensure_future(get(session, url))

        async def probe_arrived() -> bool:
            return len(app.seen) == 4

        await wait_until(probe_arrived, "the probe to reach the upstream")
        await refused_while_open(session)
        plan.gate.set()
        plan.gate = None
        status, headers = await probe
        assert (status, headers["x-sidecar-attempts"]) == (200, "1")
        assert await breaker_state(a, "flaky") == "closed"
        assert await circuit_gauges(a, "flaky") == {"closed": 1, "open": 0, "half-open": 0}
        assert (await get(session, url))[0] == 200

        # Open again; this time the probe fails and the circuit opens at once.
        plan.reset(then=503)
        for _ in range(3):
            assert (await get(session, url))[0] == 503
        assert await breaker_state(a, "flaky") == "open"
        await wait_until(is_half_open, "the breaker to turn half-open again")
        seen = len(app.seen)
        status, headers = await get(session, url)
        assert (status, headers["x-sidecar-attempts"]) == (503, "1")
        assert len(app.seen) == seen + 1
        assert await breaker_state(a, "flaky") == "open"
        assert await circuit_gauges(a, "flaky") == {"closed": 0, "open": 1, "half-open": 0}
        await refused_while_open(session)


async def test_bulkhead_refuses_calls_beyond_in_flight_and_pending_limits(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    plan = Plan()
    plan.gate = asyncio.Event()
    app = await upstreams(script=plan).start()
    a = await start_a(
        make_mesh,
        narrow=direct(app.url, retry=ONCE, bulkhead={"max_concurrent": 2, "max_pending": 1}),
    )
    url = a.outbound_url + "/narrow/claims"
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.ensure_future(get(session, url)) for _ in range(2)]

        async def two_in_flight() -> bool:
            return len(app.seen) == 2

        await wait_until(two_in_flight, "two calls in flight")
        assert (await services_state(a))["narrow"]["in_flight"] == 2
        # One more may wait for a slot; the other two are refused at once.
        later = [asyncio.ensure_future(get(session, url)) for _ in range(3)]
        refused: list[tuple[int, dict[str, str]]] = []
        pending = set(later)
        while len(refused) < 2:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            refused.extend(task.result() for task in done)
        assert len(refused) == 2 and len(pending) == 1
        for status, headers in refused:
            assert status == 503
            assert headers["x-sidecar-reason"] == "bulkhead_full"
            assert headers["x-sidecar-attempts"] == "0"
        assert len(app.seen) == 2
        plan.gate.set()
        answered = await asyncio.gather(*calls, *pending)
    assert [(status, h["x-sidecar-attempts"]) for status, h in answered] == [(200, "1")] * 3
    assert len(app.seen) == 3
    assert (
        await metric(a, "sidecar_requests_total", peer="narrow", code="503", reason="bulkhead_full")
        == 2
    )


async def test_failing_endpoint_is_ejected_and_returns_after_its_ejection_time(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    good = [await upstreams().start() for _ in range(2)]
    bad_plan = Plan(then=503)
    bad = await upstreams(script=bad_plan).start()
    a = await start_a(
        make_mesh,
        trio=direct(
            good[0].url,
            good[1].url,
            bad.url,
            retry=ONCE,
            circuit_breaker={"failure_threshold": 1000},
            outlier_detection={
                "consecutive_failures": 2,
                "base_ejection": "1500ms",
                "max_ejected_percent": 50,
            },
        ),
    )
    url = a.outbound_url + "/trio/claims"

    async def bad_ejected() -> bool:
        return bool((await endpoint_state(a, "trio", bad.url))["ejected"])

    async with aiohttp.ClientSession() as session:
        assert await metric(a, "sidecar_outlier_ejections_total", peer="trio") == 0
        for _ in range(100):
            if len(bad.seen) == 2:
                break
            await get(session, url)
        assert len(bad.seen) == 2
        assert await bad_ejected()
        for g in good:
            assert (await endpoint_state(a, "trio", g.url))["ejected"] is False
        assert await metric(a, "sidecar_outlier_ejections_total", peer="trio") == 1

        # While it is out, every call goes to the other two.
        served = sum(len(g.seen) for g in good)
        for _ in range(10):
            assert (await get(session, url))[0] == 200
        assert len(bad.seen) == 2
        assert sum(len(g.seen) for g in good) == served + 10
        assert await bad_ejected(), "ejection ended during the check: raise base_ejection"

        # It has recovered meanwhile; after its ejection time it takes traffic again.
        bad_plan.reset(then=200)

        async def bad_back() -> bool:
            return not await bad_ejected()

        await wait_until(bad_back, "the ejection to end")
        for _ in range(100):
            if len(bad.seen) > 2:
                break
            assert (await get(session, url))[0] == 200
        assert len(bad.seen) > 2
    assert await metric(a, "sidecar_outlier_ejections_total", peer="trio") == 1


async def test_active_health_checks_take_an_endpoint_out_and_back(
    make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
) -> None:
    health = {"status": 200}

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.json_response({}, status=health["status"])
        return web.json_response({"ok": True})

    steady = await upstreams().start()
    wobbly = await upstreams(script=answer).start()
    a = await start_a(
        make_mesh,
        pair=direct(
            steady.url,
            wobbly.url,
            retry=ONCE,
            health_check={"path": "/healthz", "interval": "200ms", "timeout": "200ms"},
        ),
    )
    url = a.outbound_url + "/pair/claims"

    def calls_to(upstream: Upstream) -> int:
        return sum(1 for s in upstream.seen if s.path != "/healthz")

    async def wobbly_healthy() -> bool:
        return bool((await endpoint_state(a, "pair", wobbly.url))["healthy"])

    async def wobbly_unhealthy() -> bool:
        return not await wobbly_healthy()

    async with aiohttp.ClientSession() as session:
        assert await wobbly_healthy()
        assert "/healthz" in steady.paths()  # both endpoints are probed
        health["status"] = 503
        await wait_until(wobbly_unhealthy, "the health check to mark the endpoint down")
        assert (await endpoint_state(a, "pair", steady.url))["healthy"] is True
        before = calls_to(wobbly)
        for _ in range(10):
            assert (await get(session, url))[0] == 200
        assert calls_to(wobbly) == before

        health["status"] = 200
        await wait_until(wobbly_healthy, "the health check to bring the endpoint back")
        for _ in range(100):
            if calls_to(wobbly) > before:
                break
            assert (await get(session, url))[0] == 200
        assert calls_to(wobbly) > before
