"""Inbound rate limits and the concurrency cap between real sidecars; 429 honoured outbound."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from deploy.process import SidecarProcess

pytestmark = pytest.mark.timeout(90)

ONCE = {"retry": {"attempts": 1}}


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    async with session.get(url) as response:
        await response.read()
        return response.status, dict(response.headers)


async def audit(process: SidecarProcess, count: int) -> list[dict[str, object]]:
    """The audit records, once there are `count` of them (the log writes in batches)."""
    for _ in range(200):
        if process.audit_path.exists():
            lines = process.audit_path.read_text().splitlines()
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{process.name} wrote fewer than {count} audit records")


async def rate_limited_count(b: SidecarProcess, session: aiohttp.ClientSession) -> float:
    async with session.get(b.admin_url + "/metrics") as response:
        text = await response.text()
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "sidecar_requests_total"
               and s.labels.get("reason") == "rate_limited")


async def test_per_caller_and_total_limits_and_a_429_honoured(make_mesh, upstreams):
    mesh = make_mesh(["a", "b", "c"])
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url, "rate_limits": [
        {"per_caller": {"rate": "1/s", "burst": 2}},
    ]}).start()
    to_b = {"endpoints": [b.inbound_url], **ONCE}
    a = await mesh.sidecar("a", services={"b": to_b}).start()
    c = await mesh.sidecar("c", services={"b": to_b}).start()
    async with aiohttp.ClientSession() as session:
        results = [await get(session, f"{a.outbound_url}/b/claims/{n}") for n in range(3)]
        assert [status for status, _ in results] == [200, 200, 429]
        refused = results[2][1]
        assert refused["x-sidecar-reason"] == "rate_limited"
        assert refused["Retry-After"] == "1"
        # Another caller is not held back by a's bucket.
        assert (await get(session, f"{c.outbound_url}/b/claims/9"))[0] == 200
        # Honoured, the Retry-After is enough.
        await asyncio.sleep(int(refused["Retry-After"]))
        assert (await get(session, f"{a.outbound_url}/b/claims/3"))[0] == 200
        assert await rate_limited_count(b, session) == 1
    assert app_b.paths() == ["/claims/0", "/claims/1", "/claims/9", "/claims/3"]
    denied = [r for r in await audit(b, 5) if r["reason"] == "rate_limited"]
    assert [(r["source"], r["status"], r["decision"]) for r in denied] == [("a", 429, "denied")]


async def test_the_total_limit_holds_across_callers_and_the_caller_waits_out_a_429(
        make_mesh, upstreams):
    mesh = make_mesh(["a", "b", "c"])
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url, "rate_limits": [
        {"total": {"rate": "1/s", "burst": 2}},
    ]}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
    c = await mesh.sidecar("c", services={"b": {"endpoints": [b.inbound_url], **ONCE}}).start()
    async with aiohttp.ClientSession() as session:
        assert (await get(session, f"{a.outbound_url}/b/x/1"))[0] == 200
        assert (await get(session, f"{c.outbound_url}/b/x/2"))[0] == 200
        assert (await get(session, f"{c.outbound_url}/b/x/3"))[0] == 429  # c: one attempt
        # a's sidecar retries a GET as it would a 503: after the Retry-After, not before.
        status, headers = await get(session, f"{a.outbound_url}/b/x/4")
        assert (status, headers["x-sidecar-attempts"]) == (200, "2")
    assert app_b.paths() == ["/x/1", "/x/2", "/x/4"]
    assert (await audit(a, 2))[-1]["attempts"] == 2


async def test_past_max_in_flight_calls_get_503_overloaded_at_once(make_mesh, upstreams):
    mesh = make_mesh(["a", "b"])
    gate = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({})

    app_b = await upstreams(script=hold).start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url, "max_in_flight": 1}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url], **ONCE}}).start()
    async with aiohttp.ClientSession() as session:
        held = asyncio.ensure_future(get(session, f"{a.outbound_url}/b/held"))
        for _ in range(200):
            if app_b.seen:
                break
            await asyncio.sleep(0.02)
        status, headers = await get(session, f"{a.outbound_url}/b/second")
        assert (status, headers["x-sidecar-reason"]) == (503, "overloaded")
        gate.set()
        assert (await held)[0] == 200
    assert app_b.paths() == ["/held"]
