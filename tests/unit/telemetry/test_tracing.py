"""Spans, W3C context and the export path (SPEC "Tracing")."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.config import settings
from sidecar.http import problem
from sidecar.stack import Call, Direction, Handler, Layer, Reply, UpstreamError, compose
from sidecar.telemetry.tracing import (
    ATTRIBUTES,
    DropReport,
    ExportPlan,
    Tracing,
    client_span,
    ensure_trace,
    plan_export,
    server_span,
    setup_tracing,
    trace_context,
)
from tests.support.calls import Next, ok
from tests.support.calls import make_call as support_call
from tests.support.otlp import OtlpReceiver

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"
TOKEN = "eyJhbGciOiJFZERTQSJ9.secret-claims.signature"
RAW_PATH = "/patients/MRN12345678/coverage"
QUERY = "ssn=078-05-1120"
SECRETS = ("MRN12345678", "078-05-1120", "secret-claims", "user=alice")
TRACEPARENT_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[0-3]$")


def make_call(
    direction: Direction = "outbound", *, traceparent: str | None = TRACEPARENT, method: str = "GET"
) -> Call:
    """A call with PHI in its path and query, a token and baggage, and the app's context."""
    headers: dict[str, str] = {}
    if traceparent is not None:
        headers["traceparent"] = traceparent
        headers["tracestate"] = "vendor=abc"
    headers["baggage"] = "user=alice"
    headers["x-service-token"] = TOKEN
    outbound = direction == "outbound"
    return support_call(
        RAW_PATH,
        direction=direction,
        method=method,
        query=QUERY,
        headers=headers,
        source="billing-engine" if outbound else "anonymous",
        target_name="insurance-verification" if outbound else "billing-engine",
        route="/patients/{id}/coverage",
    )


def memory_plan() -> ExportPlan:
    return plan_export(settings.Tracing(exporter="otlp"), service_name="billing-engine", env={})


def memory_tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing(memory_plan(), exporter), exporter


def retry_twice() -> Layer:
    """A stand-in for the retry layer: one more attempt after a 5xx."""

    async def layer(call: Call, next: Handler) -> Reply:
        reply = await next(call)
        if reply.status >= 500:
            reply = await next(call)
        return reply

    return layer


def trace_id_of(call: Call) -> str:
    """The trace id the audit log will record for `call`."""
    assert call.trace is not None
    return call.trace.trace_id_hex


def assert_phi_free(spans: list[dict[str, object]]) -> None:
    text = json.dumps(spans)
    for secret in (*SECRETS, TOKEN):
        assert secret not in text


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with OtlpReceiver() as rx:
        yield rx


def exporting_to(
    rx: OtlpReceiver,
    *,
    max_queue_size: int | None = None,
    max_batch: int | None = None,
    export_timeout: float | None = None,
) -> Tracing:
    cfg = settings.Tracing(exporter="otlp", endpoint=rx.url)
    return setup_tracing(
        cfg,
        service_name="billing-engine",
        env={},
        delay=0.05,
        max_queue_size=max_queue_size,
        max_batch=max_batch,
        export_timeout=export_timeout,
    )


# ---- the export plan: config, then OTEL_* variables


def test_plan_follows_config_without_environment() -> None:
    cfg = settings.Tracing(exporter="otlp", endpoint="http://jaeger:4318/", sample_ratio=0.25)
    plan = plan_export(cfg, service_name="billing-engine", env={})
    assert (plan.exporter, plan.protocol) == ("otlp", "http/protobuf")
    assert plan.endpoint == "http://jaeger:4318/v1/traces"
    assert plan.service_name == "billing-engine"
    assert plan.timeout == 2.0
    assert "TraceIdRatioBased{0.25}" in plan.sampler.get_description()
    assert plan.sampler.get_description().startswith("ParentBased")


def test_otlp_endpoint_variable_turns_export_on() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "billing"}
    plan = plan_export(settings.Tracing(), service_name="billing-engine", env=env)
    assert plan.exporter == "otlp"
    assert plan.endpoint == "http://collector:4318/v1/traces"
    assert plan.service_name == "billing"


def test_signal_endpoint_is_used_as_given_and_grpc_keeps_the_base() -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom/path"}
    assert plan_export(settings.Tracing(), service_name="s", env=env).endpoint == (
        "http://c:4318/custom/path"
    )
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    plan = plan_export(settings.Tracing(exporter="otlp"), service_name="s", env=env)
    assert (plan.protocol, plan.endpoint) == ("grpc", "http://c:4317")


def test_exporter_variable_and_sdk_disabled_override_config() -> None:
    cfg = settings.Tracing(exporter="otlp", endpoint="http://jaeger:4318")
    assert plan_export(cfg, service_name="s", env={"OTEL_TRACES_EXPORTER": "none"}).exporter == (
        "none"
    )
    assert plan_export(cfg, service_name="s", env={"OTEL_TRACES_EXPORTER": "console"}).exporter == (
        "console"
    )
    assert plan_export(cfg, service_name="s", env={"OTEL_SDK_DISABLED": "true"}).exporter == "none"


def test_sampler_variables() -> None:
    env = {"OTEL_TRACES_SAMPLER": "always_off"}
    assert plan_export(settings.Tracing(), service_name="s", env=env).sampler.get_description() == (
        "AlwaysOffSampler"
    )
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    description = plan_export(
        settings.Tracing(), service_name="s", env=env
    ).sampler.get_description()
    assert description == "TraceIdRatioBased{0.5}"


def test_unsupported_values_are_ignored() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "zipkin",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        "OTEL_TRACES_SAMPLER": "sometimes",
        "OTEL_TRACES_SAMPLER_ARG": "2",
        "OTEL_BSP_MAX_QUEUE_SIZE": "-1",
    }
    cfg = settings.Tracing(exporter="console", sample_ratio=0.1)
    plan = plan_export(cfg, service_name="s", env=env)
    assert (plan.exporter, plan.protocol, plan.max_queue_size) == ("console", "http/protobuf", 2048)
    assert "TraceIdRatioBased{0.1}" in plan.sampler.get_description()


# ---- spans exported to a real OTLP/HTTP receiver


async def test_client_span_per_attempt_reaches_the_collector(receiver: OtlpReceiver) -> None:
    tracing = exporting_to(receiver)
    upstream = Next(ok(503, "upstream_connect_failure"), ok(200))
    handler = compose(
        trace_context(tracing=tracing),
        retry_twice(),
        client_span(tracing=tracing),
        terminal=upstream,
    )
    call = make_call()

    reply = await handler(call)

    assert reply.status == 200
    assert tracing.force_flush()
    spans = receiver.wait_for(lambda spans: len(spans) >= 2)
    first, second = sorted(spans, key=lambda s: s["attributes"].get("http.request.resend_count", 0))
    for span, sent in zip((first, second), upstream.headers, strict=True):
        assert span["name"] == "GET /patients/{id}/coverage"
        assert span["kind"] == "CLIENT"
        assert span["service_name"] == "billing-engine"
        assert span["trace_id"] == APP_TRACE
        assert span["parent_span_id"] == APP_SPAN  # both attempts are children of the app's span
        assert set(span["attributes"]) <= ATTRIBUTES
        # The far sidecar sees this attempt's span as its parent, and no baggage.
        assert sent["traceparent"] == f"00-{APP_TRACE}-{span['span_id']}-01"
        assert sent["tracestate"] == "vendor=abc"
        assert "baggage" not in sent
    assert "http.request.resend_count" not in first["attributes"]
    assert second["attributes"]["http.request.resend_count"] == 1
    assert first["status"] == "ERROR"
    assert first["attributes"]["error.type"] == "503"
    assert first["attributes"]["sidecar.reason"] == "upstream_connect_failure"
    assert second["status"] == "UNSET"
    assert second["attributes"] == {
        "http.request.method": "GET",
        "http.route": "/patients/{id}/coverage",
        "url.path": "/patients/{id}/coverage",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "server.address": "insurance-verification",
        "sidecar.target": "insurance-verification",
        "sidecar.source": "billing-engine",
        "peer.service": "insurance-verification",
        "http.request.resend_count": 1,
        "http.response.status_code": 200,
    }
    assert trace_id_of(call) == APP_TRACE
    assert_phi_free(spans)
    tracing.shutdown()


async def test_server_span_passes_its_context_to_the_app(receiver: OtlpReceiver) -> None:
    tracing = exporting_to(receiver)
    app = Next(ok(201))

    async def verify_and_normalise(call: Call, next: Handler) -> Reply:
        # What the token check and path normalisation do inside the server span.
        call.source = "healthcare-api"
        call.route = "/claims/{id}"
        return await next(call)

    handler = compose(server_span(tracing=tracing), verify_and_normalise, terminal=app)
    call = make_call("inbound", method="POST")
    call.server_port = 15006

    await handler(call)

    assert tracing.force_flush()
    [span] = receiver.wait_for(lambda spans: len(spans) >= 1)
    assert span["kind"] == "SERVER"
    assert span["name"] == "POST /claims/{id}"
    assert (span["trace_id"], span["parent_span_id"]) == (APP_TRACE, APP_SPAN)
    sent = app.headers[0]
    assert sent["traceparent"] == f"00-{APP_TRACE}-{span['span_id']}-01"
    assert "baggage" not in sent
    assert span["attributes"]["peer.service"] == "healthcare-api"
    assert span["attributes"]["sidecar.source"] == "healthcare-api"
    assert span["attributes"]["server.address"] == "billing-engine"
    assert span["attributes"]["server.port"] == 15006
    assert span["attributes"]["http.response.status_code"] == 201
    assert set(span["attributes"]) <= ATTRIBUTES
    assert trace_id_of(call) == APP_TRACE
    assert_phi_free([span])
    tracing.shutdown()


async def test_gzip_export_is_decoded(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    tracing = exporting_to(receiver)
    await compose(client_span(tracing=tracing), terminal=Next(ok()))(make_call())
    assert tracing.force_flush()
    receiver.wait_for(lambda spans: len(spans) == 1)
    assert receiver.encodings == ["gzip"]
    tracing.shutdown()


# ---- trace context without export


async def test_trace_id_exists_with_export_off() -> None:
    tracing = setup_tracing(settings.Tracing(exporter="none"), service_name="s", env={})
    upstream = Next(ok(), ok())
    handler = compose(
        trace_context(tracing=tracing), client_span(tracing=tracing), terminal=upstream
    )
    first, second = make_call(traceparent=None), make_call(traceparent=None)

    await handler(first)
    await handler(second)

    ids = [trace_id_of(first), trace_id_of(second)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) and i != "0" * 32 for i in ids)
    assert ids[0] != ids[1]
    for call, sent in zip((first, second), upstream.headers, strict=True):
        match = TRACEPARENT_FORMAT.match(sent["traceparent"])
        assert match is not None and match.group(1) == trace_id_of(call)
    assert tracing.dropped == 0
    tracing.shutdown()


async def test_trace_id_exists_when_no_attempt_is_made() -> None:
    tracing = setup_tracing(settings.Tracing(), service_name="s", env={})

    async def no_route(call: Call) -> Reply:
        return problem.reply("no_route", "unknown service")

    call = make_call(traceparent=None)
    await compose(trace_context(tracing=tracing), terminal=no_route)(call)
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id_of(call))

    kept = make_call()
    await compose(trace_context(tracing=tracing), terminal=no_route)(kept)
    assert trace_id_of(kept) == APP_TRACE


async def test_trace_id_exists_with_sdk_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = setup_tracing(settings.Tracing(exporter="otlp"), service_name="s")
    upstream = Next(ok())
    call = make_call(traceparent=None)
    await compose(client_span(tracing=tracing), terminal=upstream)(call)
    match = TRACEPARENT_FORMAT.match(upstream.headers[0]["traceparent"])
    assert match is not None and match.group(1) == trace_id_of(call)
    assert tracing.plan.exporter == "none"


async def test_attempts_without_incoming_context_share_one_trace() -> None:
    tracing, exporter = memory_tracing()
    handler = compose(retry_twice(), client_span(tracing=tracing), terminal=Next(ok(502), ok()))
    call = make_call(traceparent="00-garbage")
    await handler(call)
    assert tracing.force_flush()
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id_of(call)}
    assert all(s.parent is None for s in spans)  # roots: there is no parent to point at
    tracing.shutdown()


async def test_failure_is_named_by_type_only() -> None:
    tracing, exporter = memory_tracing()
    handler = compose(
        client_span(tracing=tracing),
        terminal=Next(UpstreamError("connect-failure", sent=False)),
    )
    with pytest.raises(UpstreamError):
        await handler(make_call())
    assert tracing.force_flush()
    [span] = exporter.get_finished_spans()
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is None
    assert span.attributes is not None and span.attributes["error.type"] == "connect-failure"
    assert not span.events  # no exception event, no message
    tracing.shutdown()


async def test_unknown_method_and_relayed_free_text_reason_are_not_shown() -> None:
    tracing, exporter = memory_tracing()
    handler = compose(client_span(tracing=tracing), terminal=Next(ok(200, "Smith, John")))
    await handler(make_call(method="PROPFIND"))
    assert tracing.force_flush()
    [span] = exporter.get_finished_spans()
    assert span.name == "OTHER /patients/{id}/coverage"
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "OTHER"
    assert "sidecar.reason" not in span.attributes
    tracing.shutdown()


async def test_ensure_trace_reads_the_incoming_context_once() -> None:
    tracing, _ = memory_tracing()
    call = make_call()
    first = ensure_trace(call, tracing)
    call.headers["traceparent"] = f"00-{'1' * 32}-{'2' * 16}-01"  # as an attempt rewrites it
    assert ensure_trace(call, tracing) is first
    assert first.trace_id_hex == APP_TRACE
    tracing.shutdown()


# ---- a broken collector never affects calls


async def test_hanging_collector_drops_spans_and_calls_complete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with OtlpReceiver(mode="hang") as rx:
        tracing = exporting_to(rx, max_queue_size=4, max_batch=2, export_timeout=0.2)
        handler = compose(client_span(tracing=tracing), terminal=Next(*[ok()] * 20))
        replies = [await handler(make_call()) for _ in range(20)]

        assert [r.status for r in replies] == [200] * 20
        # At most the queue (4) and one batch in export (2) were not dropped at once.
        assert tracing.dropped >= 14
        tracing.shutdown(timeout=0.1)
        assert tracing.dropped == 20


async def test_failing_collector_counts_drops(receiver: OtlpReceiver) -> None:
    receiver.mode = "fail"
    tracing = exporting_to(receiver)
    handler = compose(client_span(tracing=tracing), terminal=Next(ok(), ok(), ok()))
    for _ in range(3):
        assert (await handler(make_call())).status == 200
    assert tracing.force_flush()
    assert tracing.dropped == 3
    assert receiver.requests >= 1
    tracing.shutdown()


def test_span_queue_drops_when_full_without_blocking() -> None:
    class Gated(InMemorySpanExporter):
        """Holds every export until the test opens the gate, like a slow collector."""

        def __init__(self) -> None:
            super().__init__()
            self.gate = threading.Event()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.gate.wait(30)
            return super().export(spans)

    exporter = Gated()
    plan = replace(memory_plan(), max_queue_size=3, max_batch=3, delay=60.0)
    tracing = Tracing(plan, exporter)
    call = make_call()
    trace = ensure_trace(call, tracing)
    for _ in range(10):
        tracing.start_span(
            "GET /", kind=SpanKind.CLIENT, parent=trace.parent, trace_id=trace.trace_id
        ).end()

    # The export thread holds at most one batch (3) and the queue at most 3 more.
    assert tracing.dropped >= 4
    exporter.gate.set()
    assert tracing.force_flush(timeout=30)
    assert len(exporter.get_finished_spans()) + tracing.dropped == 10
    tracing.shutdown()


def test_drop_report_logs_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    report = DropReport(every=10.0, monotonic=lambda: now[0])
    with caplog.at_level("WARNING", logger="sidecar.tracing"):
        report(1, "queue_full")
        report(1, "queue_full")
        report(3, "export_failed")
        now[0] = 10.0
        report(1, "queue_full")
    lines = [
        (r.msg, getattr(r, "dropped", None), getattr(r, "cause", None)) for r in caplog.records
    ]
    assert lines == [
        ("trace spans dropped", 1, "queue_full"),
        ("trace spans dropped", 3, "export_failed"),
        ("trace spans dropped", 2, "queue_full"),
    ]
