"""The bench's app: every GET answers 200 with the same JSON body of 1 KiB
(and every POST, a saga's step, 201 with it).

It does nothing else (no recording, no scripting), so that what the bench
measures is the sidecars, not the app. `serving()` runs it in the caller's
loop; `python -m bench.upstream --port N` runs it as a process of its own,
which the bench pins to a core.
"""

from __future__ import annotations

import argparse
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


def application() -> web.Application:
    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    app.router.add_post("/{tail:.*}", made)
    return app


async def answer(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def made(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=201, body=BODY, content_type="application/json")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[str]:
    """The app on a free port of 127.0.0.1 for the block; its base URL."""
    runner = web.AppRunner(application(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(application(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
