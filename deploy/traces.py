"""The demo's own trace collector: an OTLP/HTTP receiver and a span-tree printer.

When no `OTEL_EXPORTER_OTLP_ENDPOINT` is set, `make demo` has the sidecars
export here (the same protobuf a Jaeger or an OpenTelemetry Collector gets,
decoded with opentelemetry-proto) and prints each encounter's trace as a tree:
span name, service, kind, duration and the answer's status.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str  # lowercase hex
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: str  # SERVER, CLIENT, ...
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # UNSET, OK or ERROR

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def decode(body: bytes) -> list[Span]:
    """The spans of one OTLP/HTTP protobuf export request (gzip-encoded or not).

    The one OTLP span decoder: the tests' receiver (tests/support/otlp.py) uses it too.
    """
    if body[:2] == GZIP_MAGIC:
        body = gzip.decompress(body)
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    spans = []
    for resource_spans in message.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        service=str(resource.get("service.name", "?")),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=attributes_of(span.attributes),
                        status=Status.StatusCode.Name(span.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                    )
                )
    return spans


class TraceReceiver:
    """Accepts `POST /v1/traces` on 127.0.0.1 (a free port) and keeps every span."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL, as an exporter's endpoint takes it."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TraceReceiver:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def trace(self, trace_id: str) -> list[Span]:
        return [span for span in self.spans if span.trace_id == trace_id]

    async def wait_for_trace(
        self, trace_id: str, *, services: Iterable[str], spans: int, within: float
    ) -> list[Span]:
        """The trace once every one of `services` has sent spans, `spans` in all.

        What has arrived is returned when `within` seconds have passed.
        """
        wanted = set(services)
        ends = time.monotonic() + within

        def complete() -> bool:
            have = self.trace(trace_id)
            return len(have) >= spans and wanted <= {span.service for span in have}

        while not complete():
            left = ends - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        return self.trace(trace_id)

    async def _receive(self, request: web.Request) -> web.Response:
        try:
            spans = decode(await request.read())
        except ValueError:  # protobuf's DecodeError is one
            return web.Response(status=400)
        self.spans.extend(spans)
        self._arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


def tree_lines(spans: list[Span], indent: str = "  ") -> list[str]:
    """One line per span, children under their parent, siblings in start order.

    A span whose parent is not among `spans` is shown as a root.
    """
    ids = {span.span_id for span in spans}
    children: dict[str, list[Span]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else ""
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            lines.append(indent * depth + describe(span))
            walk(span.span_id, depth + 1)

    walk("", 0)
    return lines


def describe(span: Span) -> str:
    status = span.attributes.get("http.response.status_code")
    reason = span.attributes.get("sidecar.reason")
    answer = f" -> {status}" if status is not None else ""
    answer += f" {reason}" if reason else ""
    return f"{span.name} [{span.service}, {span.kind.lower()}] {span.duration_ms:.1f} ms{answer}"


def attributes_of(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValue pairs as a plain dict."""
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, which)
