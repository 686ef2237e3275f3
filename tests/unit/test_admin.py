"""The admin port's lifecycle endpoints, driven with a fake `AdminView` (no process)."""

from __future__ import annotations

from typing import Any
from unittest import mock

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecar.admin import admin_app
from sidecar.config.settings import Config, Identity


class View:
    """What the admin port may ask, scripted."""

    def __init__(self, outbound: list[str] | None = None) -> None:
        self.config = Config(service="a", identity=Identity())
        self.session: aiohttp.ClientSession | None = None
        self.outbound = outbound or []
        self.shutdowns = 0

    def not_ready(self) -> list[str]:
        return ["app health check failed: the app did not answer"]

    def outbound_not_ready(self) -> list[str]:
        return list(self.outbound)

    def shutdown(self) -> None:
        self.shutdowns += 1

    def service_state(self) -> dict[str, Any]:
        return {}

    def render_metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"


async def answer(view: View, method: str, path: str, peer: str = "127.0.0.1") -> web.Response:
    app = admin_app(view)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default)
    request = make_mocked_request(method, path, app=app, transport=transport)
    match = await app.router.resolve(request)
    response = await match.handler(request)
    assert isinstance(response, web.Response)
    return response


async def test_readyz_outbound_asks_only_for_the_outbound_path() -> None:
    ready = await answer(View(), "GET", "/readyz/outbound")
    assert (ready.status, ready.text) == (200, '{"ready": true}')
    waiting = await answer(View(["outbound listener not up"]), "GET", "/readyz/outbound")
    assert waiting.status == 503 and "outbound listener not up" in (waiting.text or "")


async def test_shutdown_starts_the_drain_and_answers_202() -> None:
    view = View()
    response = await answer(view, "POST", "/admin/shutdown")
    assert (response.status, view.shutdowns) == (202, 1)
    response = await answer(view, "POST", "/admin/shutdown", peer="::1")
    assert (response.status, view.shutdowns) == (202, 2)


async def test_shutdown_is_refused_to_a_peer_off_loopback() -> None:
    # An admin port bound wider than loopback still cannot be stopped from elsewhere.
    view = View()
    response = await answer(view, "POST", "/admin/shutdown", peer="10.1.2.3")
    assert (response.status, view.shutdowns) == (403, 0)
