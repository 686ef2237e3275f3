"""The bench's app: every GET answers 200 with the same JSON body of 1 KiB,
every POST (a saga's step) 201 with it.

It does nothing else (no recording, no scripting), so that what the bench
measures is the sidecars, not the app.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web

BODY_BYTES = 1024


def _body() -> bytes:
    """A claim-shaped JSON document padded to exactly BODY_BYTES."""
    lines = [{"code": f"L{n:03d}", "amount_cents": 100 * n} for n in range(1, 13)]
    doc = {"claim_id": "CLM-BENCH", "status": "accepted", "lines": lines, "note": ""}
    doc["note"] = "x" * (BODY_BYTES - len(json.dumps(doc)))  # ASCII: characters are bytes
    return json.dumps(doc).encode()


BODY = _body()


async def answer(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def made(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=201, body=BODY, content_type="application/json")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[str]:
    """The app on a free port of 127.0.0.1 for the block; its base URL."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    app.router.add_post("/{tail:.*}", made)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
