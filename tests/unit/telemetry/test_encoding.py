"""Our OTLP encoder against the SDK's, and the HTTP exporter that sends its bytes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import trace_exporter as sdk_http
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from sidecar.config import settings
from sidecar.stack import Call, Handler, Layer, Reply, UpstreamError, compose
from sidecar.telemetry.encoding import encode_request
from sidecar.telemetry.export import _without_trace_state, plan_export
from sidecar.telemetry.http_export import DirectHttpExporter
from sidecar.telemetry.tracing import Tracing, client_span, server_span, setup_tracing
from tests.support.calls import Next, make_call, ok
from tests.support.otlp import OtlpReceiver

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def assert_encoded_as_the_sdk_does(spans: Sequence[ReadableSpan]) -> None:
    ours = encode_request(spans)
    theirs = encode_spans(spans).SerializePartialToString()
    decode = ExportTraceServiceRequest.FromString
    assert decode(ours) == decode(theirs)
    assert ours == theirs  # today even byte for byte: the same field order


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with OtlpReceiver() as rx:
        yield rx


def retry_once() -> Layer:
    async def layer(call: Call, next: Handler) -> Reply:
        reply = await next(call)
        return await next(call) if reply.status >= 500 else reply

    return layer


async def spans_of_the_layers() -> list[ReadableSpan]:
    """What the layers make: retried and failed CLIENT spans, SERVER spans, with and without
    a caller's context and tracestate; as the export queue hands them to the exporter."""
    exporter = InMemorySpanExporter()
    plan = plan_export(settings.Tracing(exporter="otlp"), service_name="billing-engine", env={})
    tracing = Tracing(plan, exporter)
    outbound = compose(
        retry_once(), client_span(tracing=tracing), terminal=Next(ok(503, "circuit_open"), ok())
    )
    refused = UpstreamError("connect-failure", sent=False)
    failing = compose(client_span(tracing=tracing), terminal=Next(refused))
    inbound = compose(server_span(tracing=tracing), terminal=Next(ok(201)))
    context = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    await outbound(make_call("/claims/7", headers=context, source="billing-engine",
                             target_name="insurance", route="/claims/{id}"))
    with pytest.raises(UpstreamError):
        await failing(make_call(target_name="insurance"))
    call = make_call("/x", direction="inbound", method="POST", headers=context,
                     source="healthcare-api", target_name="billing-engine")
    call.server_port = 15006
    call.peer_id = "spiffe://mesh/healthcare-api"
    await inbound(call)
    assert tracing.force_flush()
    tracing.shutdown()
    return [_without_trace_state(span) for span in exporter.get_finished_spans()]


async def test_the_layers_spans_encode_as_the_sdk_encodes_them() -> None:
    spans = await spans_of_the_layers()
    assert len(spans) == 4
    assert_encoded_as_the_sdk_does(spans)
    assert_encoded_as_the_sdk_does(spans[:1])
    assert encode_request([]) == encode_spans([]).SerializePartialToString() == b""


def test_resources_scopes_events_links_and_bad_values_encode_as_the_sdk_does() -> None:
    remote = SpanContext(7, 8, is_remote=True, trace_flags=TraceFlags(1))
    scopes = (
        InstrumentationScope("sidecar"),
        InstrumentationScope("x", "1.0", "https://s", {"a": 1}),
    )
    resources = (Resource.create({"service.name": "a"}), Resource({"k": "v"}, "https://schema"))
    spans = [
        ReadableSpan(
            name=f"span {i}",
            context=SpanContext(2**128 - 1 - i, i + 1, is_remote=False,
                                trace_state=TraceState([("v", "1"), ("w", "2")])),
            parent=remote if i % 2 else None,
            resource=resources[i % 2],
            instrumentation_scope=scopes[i % 3 % 2] if i % 3 != 2 else None,
            attributes={"too big": 2**63, "fine": -1, "surrogate": "a\ud800", "": "no key",
                        "list": (1.5, float("-inf")), "map": {"n": None, "b": b"\x00"}},
            kind=list(SpanKind)[i % 5],
            status=Status(StatusCode.ERROR, "why") if i % 2 else Status(StatusCode.OK),
            start_time=i * 10**18,
            end_time=2**64 - 1,
        )
        for i in range(6)
    ]
    assert_encoded_as_the_sdk_does(spans)


# ---- the exporter


def test_http_exporter_writes_the_body_itself() -> None:
    exporter = DirectHttpExporter(endpoint="http://127.0.0.1:9/v1/traces")
    assert exporter.direct, "the SDK exporter's insides changed: the direct path is off"
    exporter.shutdown()


async def test_spans_reach_a_collector_without_the_sdk_encoder(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(spans: object) -> None:
        raise AssertionError("the SDK's encoder was used")

    monkeypatch.setattr(sdk_http, "encode_spans", refuse)
    cfg = settings.Tracing(exporter="otlp", endpoint=receiver.url)
    tracing = setup_tracing(cfg, service_name="billing-engine", env={}, delay=0.05)
    handler = compose(client_span(tracing=tracing), terminal=Next(ok()))
    await handler(make_call("/claims/1", target_name="insurance", route="/claims/{id}"))
    assert tracing.force_flush()
    [span] = receiver.wait_for(lambda spans: len(spans) == 1)
    assert (span["name"], span["kind"], span["service_name"]) == (
        "GET /claims/{id}", "CLIENT", "billing-engine"
    )
    assert span["attributes"]["http.response.status_code"] == 200
    assert tracing.dropped == 0
    tracing.shutdown()
