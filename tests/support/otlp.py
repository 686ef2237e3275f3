"""A real OTLP/HTTP trace receiver for tests: what the exporter sent, decoded.

`OtlpReceiver` listens on 127.0.0.1 (an ephemeral port), accepts
`POST /v1/traces` (protobuf, gzip or deflate encoded or not), and keeps
every span as a plain dict:

    {"name", "kind", "trace_id", "span_id", "parent_span_id", "attributes",
     "service_name", "status"}

Ids are lowercase hex ("" for no parent), `kind` is SERVER/CLIENT/...,
`status` UNSET/OK/ERROR. Run it on the test's loop (`async with`) or in a
thread of its own (`with`) when the code under test blocks the loop, as a
synchronous `force_flush` does. `mode` makes it a broken collector: "hang"
never answers (until the receiver stops), "fail" answers 500.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from deploy.traces import Span, decode

MODES = ("ok", "hang", "fail")
SpanDict = dict[str, Any]
Predicate = Callable[[list[SpanDict]], bool]


class OtlpReceiver:
    def __init__(self, mode: str = "ok") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.requests = 0  # POSTs received, answered or not
        self.encodings: list[str] = []  # Content-Encoding of each POST ("" for none)
        self._spans: list[SpanDict] = []
        self._changed = threading.Condition()
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None  # lets hanging handlers go at stop
        self._arrived: asyncio.Event | None = None  # set on the serving loop at each POST
        self._port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The base URL, as an exporter's `endpoint` takes it."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def spans(self) -> list[SpanDict]:
        with self._changed:
            return list(self._spans)

    # ---- on the current loop

    async def start(self) -> None:
        self._release = asyncio.Event()
        self._arrived = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for_async(self, predicate: Predicate, within: float = 5.0) -> list[SpanDict]:
        """Like `wait_for`, for a receiver on the caller's own loop; `within` seconds."""
        assert self._arrived is not None, "start the receiver on this loop first"
        async with asyncio.timeout(within):
            while not predicate(self.spans):
                self._arrived.clear()
                await self._arrived.wait()
        return self.spans

    # ---- in a thread of its own

    def __enter__(self) -> OtlpReceiver:
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), daemon=True, name="otlp-receiver"
        )
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the OTLP receiver did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.start()
            started.set()
            await self._stop.wait()
            await self.stop()

        asyncio.run(main())

    def wait_for(self, predicate: Predicate, timeout: float = 5.0) -> list[SpanDict]:
        """Block until `predicate(spans)` holds; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"spans never matched; have {len(self._spans)}")
                self._changed.wait(left)
            return list(self._spans)

    # ---- the endpoint

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        encoding = request.headers.get("Content-Encoding", "").lower()
        self.encodings.append(encoding)
        if self.mode == "hang":
            assert self._release is not None
            await self._release.wait()
            return web.Response(status=503)
        if self.mode == "fail":
            return web.Response(status=500)
        # aiohttp undoes gzip and deflate itself; decode undoes gzip in case a version does not.
        spans = [_as_dict(span) for span in decode(await request.read())]
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()
        if self._arrived is not None:
            self._arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


def _as_dict(span: Span) -> SpanDict:
    """A decoded span in the shape the tests read (the module docstring's)."""
    return {
        "name": span.name,
        "kind": span.kind,
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_id,
        "attributes": span.attributes,
        "service_name": span.service,
        "status": span.status,
    }
