"""The bench's app: every GET answers 200 with the same JSON body of about 1 KiB.

It does nothing else (no recording, no scripting), so that what the bench
measures is the sidecars, not the app.
"""

from __future__ import annotations

import json

from aiohttp import web

BODY_BYTES = 1024


def _body() -> bytes:
    """A claim-shaped JSON document padded to exactly BODY_BYTES."""
    lines = [{"code": f"L{n:03d}", "amount_cents": 100 * n} for n in range(1, 13)]
    doc = {"claim_id": "CLM-BENCH", "status": "accepted", "lines": lines, "note": ""}
    doc["note"] = "x" * (BODY_BYTES - len(json.dumps(doc)))  # ASCII: characters are bytes
    return json.dumps(doc).encode()


BODY = _body()


class Upstream:
    """The app on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")
