"""What the example services share: settings, `/health`, calling a neighbour, reporting.

Nothing here knows about the sidecar beyond the address calls go to. A
neighbour such as `billing-engine` is reached at `$BILLING_ENGINE_URL` when
that is set, else at `$SIDECAR_OUTBOUND/billing-engine` (the local sidecar's
outbound port, which takes the first path segment as the service name). The
app forwards the W3C trace context it was called with, as any traced app does,
so the sidecars can join its calls into one trace.

The sidecar's own API (`$SIDECAR_OUTBOUND/_sidecar/v1/...`) runs workflows
for the app over plain HTTP: `Neighbours.workflow` calls it, and `report`
hands a compliance event to a fan-out, so the sidecar delivers it even while
compliance-monitor is down. Every answer an app gives carries its own
`status`, so a workflow step's response can say how it went.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_OUTBOUND = "http://127.0.0.1:15001"
TRACE_HEADERS = ("traceparent", "tracestate")
# Longer than the sidecar's own call timeout, so the sidecar's 504 reaches the app.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)
SIDECAR_API = "/_sidecar/v1"
COMPLIANCE = "compliance-monitor"


@dataclass(frozen=True, slots=True)
class AppSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    outbound: str = DEFAULT_OUTBOUND
    upstreams: Mapping[str, str] = field(default_factory=dict)  # service -> base URL

    def url_for(self, service: str) -> str:
        """Where calls to `service` go: its own URL if configured, else via the sidecar."""
        base = self.upstreams.get(service) or f"{self.outbound.rstrip('/')}/{service}"
        return base.rstrip("/")

    @property
    def sidecar_api(self) -> str:
        """The local sidecar's own API (workflows)."""
        return self.outbound.rstrip("/") + SIDECAR_API


def settings_from(
    environ: Mapping[str, str], argv: Sequence[str] | None = None, *, prog: str | None = None
) -> AppSettings:
    """Settings from `APP_HOST`, `APP_PORT`, `SIDECAR_OUTBOUND`, `<SERVICE>_URL`, then flags."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default=environ.get("APP_HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=int(environ.get("APP_PORT", DEFAULT_PORT)))
    parser.add_argument(
        "--outbound",
        default=environ.get("SIDECAR_OUTBOUND", DEFAULT_OUTBOUND),
        help="base URL of the local sidecar's outbound listener",
    )
    args = parser.parse_args(argv)
    return AppSettings(
        host=args.host, port=args.port, outbound=args.outbound, upstreams=upstreams_from(environ)
    )


def upstreams_from(environ: Mapping[str, str]) -> dict[str, str]:
    """`BILLING_ENGINE_URL=...` names billing-engine's address: the usual twelve-factor way."""
    return {
        key[: -len("_URL")].lower().replace("_", "-"): value
        for key, value in environ.items()
        if key.endswith("_URL") and value
    }


@dataclass(frozen=True, slots=True)
class Reply:
    """What a neighbour answered; `status` is None when no answer came at all."""

    service: str
    status: int | None
    body: Any = None
    reason: str | None = None  # x-sidecar-reason, when the mesh refused or failed the call
    error: str | None = None  # why no answer came

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def field(self, name: str) -> Any:
        return self.body.get(name) if isinstance(self.body, dict) else None

    def summary(self) -> dict[str, Any]:
        """One node of the call tree the example services report back to their callers."""
        node: dict[str, Any] = {
            "service": self.service,
            "status": self.status,
            "reason": self.reason,
            "source_service": self.field("source_service"),
        }
        if self.error is not None:
            node["error"] = self.error
        if not self.ok and self.body is not None:
            node["answer"] = self.body
        calls = self.field("calls")
        if isinstance(calls, list) and calls:
            node["calls"] = calls
        return node


class Neighbours:
    """Calls other services, carrying the trace context of the request being served."""

    def __init__(self, session: aiohttp.ClientSession, settings: AppSettings) -> None:
        self._session = session
        self._settings = settings

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        context: Mapping[str, str],
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return await self._send(service, method, self._settings.url_for(service) + path,
                                context=context, json=json, headers=headers)

    async def workflow(
        self,
        method: str,
        path: str,
        *,
        context: Mapping[str, str],
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """A call to the local sidecar's own API: `POST /sagas`, `POST /fanout`, ..."""
        return await self._send("sidecar", method, self._settings.sidecar_api + path,
                                context=context, json=json, headers=headers)

    async def _send(self, service: str, method: str, url: str, *, context: Mapping[str, str],
                    json: Any, headers: Mapping[str, str] | None) -> Reply:
        sent = {**context, **(headers or {})}
        try:
            async with self._session.request(
                method, url, json=json, headers=sent, allow_redirects=False
            ) as response:
                return Reply(
                    service=service,
                    status=response.status,
                    body=await _body_of(response),
                    reason=response.headers.get("x-sidecar-reason"),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Reply(service=service, status=None, error=type(exc).__name__)


NEIGHBOURS = web.AppKey("neighbours", Neighbours)
SETTINGS = web.AppKey("settings", AppSettings)


async def _body_of(response: aiohttp.ClientResponse) -> Any:
    text = await response.text()
    if "json" in (response.content_type or ""):
        try:
            return await response.json(content_type=None)
        except ValueError:
            pass
    return text[:500]


def trace_context(request: web.Request) -> dict[str, str]:
    """The W3C trace headers this request came with, to send on with its own calls."""
    return {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}


def trace_id(request: web.Request) -> str | None:
    parts = request.headers.get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return None


def seen(request: web.Request) -> dict[str, Any]:
    """Who called, as the sidecar vouched for it, and in which trace: echoed in every reply."""
    return {
        "source_service": request.headers.get("x-source-service"),
        "trace_id": trace_id(request),
    }


def bad_request(message: str) -> web.HTTPBadRequest:
    """A 400 with a JSON body saying what was wrong (raise it)."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 that says so."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise bad_request("expected a JSON object")
    return body


def reply(request: web.Request, payload: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response({**payload, **seen(request), "status": status}, status=status)


def idempotency_key(request: web.Request) -> str:
    """The request's Idempotency-Key, or a 400 that says it is needed."""
    key = request.headers.get("Idempotency-Key")
    if not key:
        raise bad_request("an Idempotency-Key header is required")
    return key


async def report(request: web.Request, event: Mapping[str, Any], *, key: str) -> dict[str, Any]:
    """Hand a compliance event to the sidecar's fan-out; the call-tree node of that.

    The sidecar stores it before answering and delivers it to compliance-monitor
    at least once, with `key` as its Idempotency-Key, however long that is down.
    """
    answer = await request.app[NEIGHBOURS].workflow(
        "POST",
        "/fanout",
        context=trace_context(request),
        json={"targets": [COMPLIANCE], "method": "POST", "path": "/events", "body": event},
        headers={"Idempotency-Key": key},
    )
    node: dict[str, Any] = {"service": COMPLIANCE, "status": answer.status, "via": "fan-out",
                            "reason": answer.reason, "fanout": answer.field("id")}
    if answer.error is not None:
        node["error"] = answer.error
    return node


def base_app(name: str, settings: AppSettings) -> web.Application:
    """An app with `GET /health` and a client for its neighbours."""
    app = web.Application()
    app[SETTINGS] = settings

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": name})

    async def client(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            app[NEIGHBOURS] = Neighbours(session, settings)
            yield

    app.router.add_get("/health", health)
    app.cleanup_ctx.append(client)
    return app


def run(
    name: str, make_app: Callable[[AppSettings], web.Application], argv: Sequence[str] | None = None
) -> None:
    """Serve one example service until SIGTERM or SIGINT."""
    settings = settings_from(os.environ, argv, prog=name)
    print(
        f"{name}: listening on http://{settings.host}:{settings.port}, "
        f"calling others via {settings.outbound}",
        file=sys.stderr,
        flush=True,
    )
    # No access log: its lines would carry paths with patient identifiers. The
    # accept queue is as deep as the sidecar's listeners: past aiohttp's 128 a burst
    # of connects from the sidecar would wait out the kernel's 1 s SYN resend.
    web.run_app(
        make_app(settings), host=settings.host, port=settings.port, access_log=None, print=None,
        backlog=1024,
    )
