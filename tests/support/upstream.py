"""A programmable aiohttp upstream that counts and records what it receives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

Script = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """An app on 127.0.0.1. By default it echoes what it saw as JSON.

    `script` replaces the default answer; `seen` lists every request received.
    """

    port: int = 0
    script: Script | None = None
    seen: list[Seen] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, request.query_string,
                              {k.lower(): v for k, v in request.headers.items()}, body))
        if self.script is not None:
            return await self.script(request)
        return web.json_response({
            "method": request.method,
            "path": request.raw_path,
            "source": request.headers.get("x-source-service"),
            "token": request.headers.get("x-service-token"),
            "authorization": request.headers.get("Authorization"),
            "traceparent": request.headers.get("traceparent"),
            "body_length": len(body),
        })

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve(app, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def open_connections(self) -> int:
        """Connections to this app that are open now (served or idle)."""
        assert self._runner is not None and self._runner.server is not None
        return len(self._runner.server.connections)

    async def closed_all(self) -> bool:
        """Whether no connection to this app is open (for `wait_until`)."""
        return self.open_connections() == 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """`app` on 127.0.0.1:`port` (0: a free one); its runner and the port it has."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    # As deep as the sidecar's own listener (1024): tests put a few hundred calls at an
    # app at once, and an accept queue that overflows (aiohttp's default is 128) drops
    # SYNs, which come again only after the 1 s connect timeout.
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    if port == 0:
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, port


async def slow(seconds: float, status: int = 200) -> Script:
    async def answer(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.json_response({"slow": seconds}, status=status)

    return answer
