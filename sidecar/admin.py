"""The admin listener (loopback): health, readiness, metrics, state and config.

It sees the running sidecar only through `AdminView`, so it depends on no
part of the process it describes.
"""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
from aiohttp import web

from sidecar.config.loader import redacted
from sidecar.config.settings import Config


class AdminView(Protocol):
    """What the admin port may ask of the running sidecar."""

    @property
    def config(self) -> Config: ...

    @property
    def session(self) -> aiohttp.ClientSession | None: ...

    def not_ready(self) -> list[str]: ...

    def service_state(self) -> dict[str, Any]: ...

    def render_metrics(self) -> tuple[bytes, str]: ...

    async def workflow_state(self) -> dict[str, Any] | None: ...  # None: no `workflows`


def admin_app(view: AdminView) -> web.Application:
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = await readiness(view)
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True})

    async def services(request: web.Request) -> web.Response:
        return web.json_response({"services": view.service_state()})

    async def config(request: web.Request) -> web.Response:
        return web.json_response(redacted(view.config))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = view.render_metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/services", services)
    async def workflows(request: web.Request) -> web.Response:
        state = await view.workflow_state()
        if state is None:
            return web.json_response({"error": "workflows are not configured"}, status=404)
        return web.json_response(state)

    app.router.add_get("/admin/config", config)
    app.router.add_get("/admin/workflows", workflows)
    return app


async def readiness(view: AdminView) -> list[str]:
    """Why the sidecar is not ready; empty when it is."""
    reasons = view.not_ready()
    config = view.config
    health = config.inbound.app_health_path
    if health and view.session is not None:
        url = config.inbound.app.rstrip("/") + health
        try:
            async with view.session.get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=1.0)
            ) as response:
                if not 200 <= response.status < 300:
                    reasons.append(f"app health check answered {response.status}")
        except (TimeoutError, aiohttp.ClientError):
            reasons.append("app health check failed: the app did not answer")
    return reasons
