"""The bench's yardstick: the reverse proxy anyone would write in aiohttp in 40 lines.

One ClientSession with a keep-alive pool, the request body streamed up, the
answer streamed back; no redirects followed, no decompression, hop-by-hop
headers dropped, no access log. Nothing else: what the sidecar does beyond
this is what its extra cost buys.
`python -m bench.bare_proxy --port 8001 --upstream http://127.0.0.1:8000`
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                 "transfer-encoding", "upgrade", "host"})
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with session.request(
        request.method, request.app[UPSTREAM] + request.raw_path, headers=headers,
        data=request.content if request.body_exists else None, allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, headers={
            k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=30),
            auto_decompress=False, trust_env=False, skip_auto_headers=("User-Agent",))
        yield
        await app[SESSION].close()

    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
