"""W3C trace context and spans: one CLIENT span per outbound attempt, one SERVER span inbound.

`setup_tracing` (in `export.py`) builds one TracerProvider per process and keeps it on the
returned `Tracing` (the global provider is never set, so nothing else in the
process can add spans or change it). The layers below use it:

    trace_context  outermost, outbound: reads the app's `traceparent` once, before
                   retries rewrite it, and fixes the call's trace id for the audit
                   log, even when no attempt is ever made (no_route, circuit_open)
    client_span    inside retry: one CLIENT span per attempt, its context sent on
    server_span    outermost, inbound: one SERVER span continuing the caller's trace

The trace id exists even with export off: the SDK still makes ids for spans
it does not record, and a call with no incoming context gets a fresh id.
When the app sent no context, every attempt of the call shares that fresh id
as root spans of one trace (rather than children of an invented parent that
no backend would ever receive).

Spans carry only SPEC's attribute list (and, over mTLS, the peer's SPIFFE
ID), built from the templated route, service names, the normalised method,
status and reason codes. Exceptions
are never recorded (their messages may quote the request): `error.type` only.
"""

from __future__ import annotations

from multidict import CIMultiDict
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.http.headers import BAGGAGE, TRACEPARENT, TRACESTATE
from sidecar.reasons import known as known_reason
from sidecar.resilience.classify import error_type
from sidecar.stack import Call, CallTrace, Handler, Layer, Reply, safe_method

# The export side lives in `export.py`; these names are re-exported so one
# import serves those who wire tracing in.
from sidecar.telemetry.export import (
    DropReport,
    ExportPlan,
    SpanQueue,
    Tracing,
    plan_export,
    setup_tracing,
)

__all__ = [
    "ATTRIBUTES",
    "DropReport",
    "ExportPlan",
    "SpanQueue",
    "Tracing",
    "client_span",
    "ensure_trace",
    "plan_export",
    "server_span",
    "setup_tracing",
    "trace_context",
]

# SPEC "Tracing": the only attributes a span may carry.
ATTRIBUTES = frozenset(
    {
        "http.request.method",
        "http.response.status_code",
        "http.route",
        "url.path",
        "url.scheme",
        "server.address",
        "server.port",
        "http.request.resend_count",
        "error.type",
        "network.protocol.version",
        "peer.service",
        "sidecar.source",
        "sidecar.target",
        "sidecar.reason",
        # Beyond SPEC's list (README): the peer's SPIFFE ID on a call over mTLS.
        "sidecar.peer_id",
    }
)
CONTEXT_HEADERS = (TRACEPARENT, TRACESTATE)

_PROPAGATOR = TraceContextTextMapPropagator()


# ---- the call's trace context


class _HeaderGetter(Getter[CIMultiDict[str]]):
    def get(self, carrier: CIMultiDict[str], key: str) -> list[str] | None:
        values = carrier.getall(key, [])
        return values or None

    def keys(self, carrier: CIMultiDict[str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


def ensure_trace(call: Call, tracing: Tracing) -> CallTrace:
    """The call's trace: read once from its `traceparent`/`tracestate`, else a fresh id.

    Kept in `call.trace`, so later attempts (whose headers already carry an
    earlier attempt's context) still see what the caller sent, and the audit
    log reads its trace id there.
    """
    if call.trace is not None:
        return call.trace
    parent = _PROPAGATOR.extract(call.headers, getter=_GETTER)
    context = get_current_span(parent).get_span_context()
    trace_id = context.trace_id if context.is_valid else tracing.new_trace_id()
    call.trace = CallTrace(parent=parent, trace_id=trace_id)
    return call.trace


def trace_context(*, tracing: Tracing) -> Layer:
    """Outbound, outermost: fixes the call's trace before anything can answer.

    Reads the app's W3C context once (retries later replace the header) and
    sets `call.trace`, so the audit record of a call that never
    reached an attempt (`no_route`, `circuit_open`, `bulkhead_full`) has the
    same trace id the app's own spans have. Makes no span and refuses nothing.
    """

    async def trace_context_layer(call: Call, next: Handler) -> Reply:
        ensure_trace(call, tracing)
        return await next(call)

    return trace_context_layer


def client_span(*, tracing: Tracing) -> Layer:
    """Outbound, inside retry: one CLIENT span per attempt to the target's sidecar.

    The span's parent is the context the app sent (or none: then it is a root
    in the call's trace); its own context replaces the app's `traceparent`
    on the way out, and `baggage` is dropped. A retried attempt carries
    `http.request.resend_count`. Error status for a 4xx/5xx answer or a
    failure, named by `error.type` only. Refuses nothing.
    """

    async def client_span_layer(call: Call, next: Handler) -> Reply:
        trace = ensure_trace(call, tracing)
        resend = trace.client_spans
        trace.client_spans += 1
        span = tracing.start_span(
            _name(call), kind=SpanKind.CLIENT, parent=trace.parent, trace_id=trace.trace_id
        )
        _send_context(call.headers, span)
        try:
            reply = await next(call)
        except BaseException as exc:
            _finish(span, call, client=True, resend=resend, reply=None, error=error_type(exc))
            raise
        _finish(span, call, client=True, resend=resend, reply=reply, error=None)
        return reply

    return client_span_layer


def server_span(*, tracing: Tracing) -> Layer:
    """Inbound, outermost: the SERVER span of the call, continuing the caller's trace.

    The app receives this span's context in `traceparent` (the caller's is
    replaced) and never sees `baggage`. Source, route and outcome are read
    when the answer is known, so they reflect the verified caller and the
    normalised route. Error status for a 5xx or a failure. Refuses nothing.
    """

    async def server_span_layer(call: Call, next: Handler) -> Reply:
        trace = ensure_trace(call, tracing)
        span = tracing.start_span(
            _name(call), kind=SpanKind.SERVER, parent=trace.parent, trace_id=trace.trace_id
        )
        _send_context(call.headers, span)
        try:
            reply = await next(call)
        except BaseException as exc:
            _finish(span, call, client=False, resend=0, reply=None, error=error_type(exc))
            raise
        _finish(span, call, client=False, resend=0, reply=reply, error=None)
        return reply

    return server_span_layer


def _send_context(headers: CIMultiDict[str], span: Span) -> None:
    """Replace the W3C context in `headers` with `span`'s; drop `baggage`.

    Written from the span's context directly, in the W3C format the SDK's
    propagator writes, without building the `Context` that `inject` would
    only search for the span again: about half of this function's cost, on
    every call, sampled or not.
    """
    for name in (*CONTEXT_HEADERS, BAGGAGE):
        headers.popall(name, None)
    context = span.get_span_context()
    if not context.is_valid:
        return
    headers[TRACEPARENT] = (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    if context.trace_state:
        headers[TRACESTATE] = context.trace_state.to_header()


def _name(call: Call) -> str:
    return f"{safe_method(call.method)} {call.route}"


def _finish(
    span: Span, call: Call, *, client: bool, resend: int, reply: Reply | None, error: str | None
) -> None:
    """Name, attributes and status from what is known now; then end the span.

    A span the sampler dropped records nothing: it only carried the context
    (with its not-sampled flag) to the next hop, so nothing is built for it.
    """
    if not span.is_recording():
        span.end()
        return
    span.update_name(_name(call))
    attributes: dict[str, str | int] = {
        "http.request.method": safe_method(call.method),
        "http.route": call.route,
        "url.path": call.route,  # templated: the raw path never leaves the call
        "url.scheme": call.scheme,
        "network.protocol.version": call.http_version,
    }
    if call.target:
        attributes["server.address"] = call.target
        attributes["sidecar.target"] = call.target
    if call.server_port is not None:
        attributes["server.port"] = call.server_port
    if call.source:
        attributes["sidecar.source"] = call.source
    peer = call.target if client else (call.source if call.source != "anonymous" else "")
    if peer:
        attributes["peer.service"] = peer
    if call.peer_id is not None:
        attributes["sidecar.peer_id"] = call.peer_id
    if resend > 0:
        attributes["http.request.resend_count"] = resend
    failed = error is not None
    if reply is not None:
        attributes["http.response.status_code"] = reply.status
        reason = known_reason(reply.reason)
        if reason is not None:
            attributes["sidecar.reason"] = reason
        failed = reply.status >= (400 if client else 500)
        if failed:
            error = str(reply.status)
    if error is not None:
        attributes["error.type"] = error
    assert ATTRIBUTES.issuperset(attributes), "a span attribute outside SPEC's list"
    span.set_attributes(attributes)
    if failed:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
