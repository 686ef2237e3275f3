"""The bench's OTLP sink: takes `POST /v1/traces` and throws the spans away.

So that tracing at sample ratio 1.0 exports for real (serialisation, the
export thread, HTTP) without a collector. `GET /stats` says how many exports
and bytes arrived, so the bench can tell that spans did flow.
`python -m bench.sink --port 4318`
"""

from __future__ import annotations

import argparse

from aiohttp import web

STATS = web.AppKey("stats", dict)


async def traces(request: web.Request) -> web.Response:
    body = await request.read()
    stats = request.app[STATS]
    stats["exports"] += 1
    stats["bytes"] += len(body)
    # An empty ExportTraceServiceResponse: zero bytes of protobuf.
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


def application() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {"exports": 0, "bytes": 0}
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(application(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
