"""The admin listener (loopback): health, readiness, metrics, state and config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from sidecar.config.loader import redacted

if TYPE_CHECKING:
    from sidecar.server import Sidecar

SIDECAR_KEY = web.AppKey("sidecar", object)


def admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application()
    app[SIDECAR_KEY] = sidecar

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = await readiness(sidecar)
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True})

    async def services(request: web.Request) -> web.Response:
        return web.json_response({"services": service_state(sidecar)})

    async def config(request: web.Request) -> web.Response:
        return web.json_response(redacted(sidecar.config))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = sidecar.render_metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/services", services)
    app.router.add_get("/admin/config", config)
    return app


async def readiness(sidecar: Sidecar) -> list[str]:
    """Why the sidecar is not ready; empty when it is."""
    reasons = []
    if sidecar.draining:
        reasons.append("draining")
    if sidecar.stacks is None:
        reasons.append("config or keys not loaded")
    if not sidecar.listening:
        reasons.append("listeners not up")
    health = sidecar.config.inbound.app_health_path
    if health and sidecar.shared is not None:
        url = sidecar.config.inbound.app.rstrip("/") + health
        try:
            async with sidecar.shared.session.get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=1.0)
            ) as response:
                if not 200 <= response.status < 300:
                    reasons.append(f"app health check answered {response.status}")
        except (TimeoutError, aiohttp.ClientError):
            reasons.append("app health check failed: the app did not answer")
    return reasons


def service_state(sidecar: Sidecar) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shared = sidecar.shared
    for name in sidecar.config.services:
        out[name] = {
            "breaker": shared.breakers.for_service(name).state if shared else "closed",
            "in_flight": sidecar.in_flight(name),
            "endpoints": sidecar.endpoint_state(name),
        }
    return out
