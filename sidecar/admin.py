"""The admin listener (loopback): health, readiness, metrics, state, config, shutdown.

It sees the running sidecar only through `AdminView`, so it depends on no
part of the process it describes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from sidecar.config.loader import redacted
from sidecar.config.settings import Config
from sidecar.http.listener import Answer

log = logging.getLogger("sidecar")


class AdminView(Protocol):
    """What the admin port may ask of the running sidecar."""

    @property
    def config(self) -> Config: ...

    @property
    def session(self) -> aiohttp.ClientSession | None: ...

    def not_ready(self) -> list[str]: ...

    def outbound_not_ready(self) -> list[str]: ...

    def shutdown(self) -> None:
        """Start the drain SIGTERM starts (once; a second call changes nothing)."""

    def service_state(self) -> dict[str, Any]: ...

    def render_metrics(self) -> tuple[bytes, str]: ...

    async def workflow_state(self) -> dict[str, Any] | None: ...  # None: no `workflows`


def admin_app(view: AdminView) -> web.Application:
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = await readiness(view)
        if reasons:
            return _json({"ready": False, "reasons": reasons}, status=503)
        return _json({"ready": True})

    async def readyz_outbound(request: web.Request) -> web.Response:
        # For the app's entrypoint (`sidecar wait`): the app's own health is
        # not asked, since the app is what waits for this.
        reasons = view.outbound_not_ready()
        if reasons:
            return _json({"ready": False, "reasons": reasons}, status=503)
        return _json({"ready": True})

    async def shutdown(request: web.Request) -> web.Response:
        # Istio's /quitquitquit, for a batch job done with its sidecar. Even
        # when the admin port is bound wider, only a process beside it may stop it.
        if not _is_loopback(request.remote):
            return _json(
                {"error": "POST /admin/shutdown is taken from loopback only"}, status=403)
        log.info("shutdown asked on the admin port")
        view.shutdown()
        return _json({"draining": True}, status=202)

    async def services(request: web.Request) -> web.Response:
        return _json({"services": view.service_state()})

    async def config(request: web.Request) -> web.Response:
        return _json(redacted(view.config))

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = view.render_metrics()
        response = Answer(body=body)
        response.headers["Content-Type"] = content_type
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/readyz/outbound", readyz_outbound)
    app.router.add_post("/admin/shutdown", shutdown)
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


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


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


def _json(doc: Any, status: int = 200) -> web.Response:
    """A JSON answer that names no server software (like every answer of the sidecar)."""
    return Answer(text=json.dumps(doc), status=status, content_type="application/json")
