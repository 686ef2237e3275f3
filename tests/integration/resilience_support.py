"""Helpers shared by the resilience integration tests: scripted answers, admin and metrics."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from deploy.process import SidecarProcess
from tests.support.mesh import Mesh

# Poll loops wait for a state, never for a length of time: at most this many rounds.
POLL_ROUNDS = 200
POLL_PAUSE = 0.05

# Retries without noticeable waits, so tests spend no time on backoff.
QUICK_BACKOFF = {"base": "1ms", "max": "2ms"}


class Plan:
    """An upstream script: answers `statuses` in order, then `then` for ever.

    `gate`, when set, holds every answer until the test opens it, so a test
    can keep calls in flight for as long as it needs without sleeping.
    """

    def __init__(self, *statuses: int, then: int = 200) -> None:
        self.queue: deque[int] = deque(statuses)
        self.then = then
        self.gate: asyncio.Event | None = None

    def reset(self, *statuses: int, then: int = 200) -> None:
        self.queue = deque(statuses)
        self.then = then

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if self.gate is not None:
            await self.gate.wait()
        status = self.queue.popleft() if self.queue else self.then
        return web.json_response({"answer": status}, status=status)


def direct(*urls: str, **policy: Any) -> dict[str, Any]:
    """A service outside the mesh (no token), so sidecar A calls the app or proxy at `urls`."""
    return {"endpoints": list(urls), "mesh": False, **policy}


async def start_a(make_mesh: Callable[..., Mesh], **services: dict[str, Any]) -> SidecarProcess:
    mesh = make_mesh(["a"])
    return await mesh.sidecar("a", services=services).start()


async def services_state(sidecar: SidecarProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar.admin_url + "/admin/services") as response:
            assert response.status == 200
            doc: dict[str, Any] = await response.json()
    return doc["services"]


async def breaker_state(sidecar: SidecarProcess, service: str) -> str:
    return str((await services_state(sidecar))[service]["breaker"])


async def endpoint_state(sidecar: SidecarProcess, service: str, url: str) -> dict[str, Any]:
    """The admin entry of the endpoint configured as `url`."""
    endpoints = (await services_state(sidecar))[service]["endpoints"]
    found = [e for e in endpoints if e["url"].rstrip("/") == url.rstrip("/")]
    assert len(found) == 1, endpoints
    entry: dict[str, Any] = found[0]
    return entry


async def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    """The value of the sample `name{labels}` in /metrics; 0 when it is absent."""
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar.admin_url + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def circuit_gauges(sidecar: SidecarProcess, service: str) -> dict[str, float]:
    """`sidecar_circuit_state` for each of the three states of `service`."""
    return {
        state: await metric(sidecar, "sidecar_circuit_state", peer=service, state=state)
        for state in ("closed", "open", "half-open")
    }


async def wait_until(check: Callable[[], Awaitable[object]], what: str) -> None:
    """Polls `check` until it answers something true; fails naming `what` at last."""
    for _ in range(POLL_ROUNDS):
        if await check():
            return
        await asyncio.sleep(POLL_PAUSE)
    raise AssertionError(f"still waiting for {what}")


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The problem+json body of a sidecar's own answer, checked against its header."""
    assert response.content_type == "application/problem+json"
    doc: dict[str, Any] = await response.json(content_type=None)
    assert doc["reason"] == response.headers["x-sidecar-reason"]
    assert doc["status"] == response.status
    return doc
