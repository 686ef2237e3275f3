"""One workflow call through the outbound stack, and what its answer means for the step.

The call is built as an app's call would arrive (absolute form, so routing
names the service), with the step's stable `Idempotency-Key`, so the stack
retries it under SPEC's rules and the app can deduplicate it; `workflow`
and `step` go to its audit record. Each call has an INTERNAL span of its own
(a step of the saga's one trace), whose context the call carries on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar import reasons
from sidecar.clock import Clock
from sidecar.config.settings import RetryPolicy
from sidecar.http.headers import IDEMPOTENCY_KEY, TRACEPARENT
from sidecar.stack import Body, Call, Handler, Reply
from sidecar.telemetry.tracing import Tracing
from sidecar.workflows.model import Request

MAX_RESPONSE = 1024 * 1024  # bytes of a JSON answer read for templates; larger ones are not
RETRYABLE_4XX = frozenset({408, 425, 429})
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class Result:
    """What a call came to: status, reason code, the stack's attempts, the JSON body if asked."""

    status: int
    reason: str | None
    attempts: int
    retry: RetryPolicy  # the routed service's retry settings (defaults when unrouted)
    body: Any = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def permanent(self) -> bool:
        """A 4xx other than 408, 425 and 429: sending it again will not help (SPEC)."""
        return 400 <= self.status < 500 and self.status not in RETRYABLE_4XX

    @property
    def why(self) -> str:
        """PHI-free: the sidecar's reason code, else the status."""
        return reasons.known(self.reason) or f"status_{self.status}"


def parent_of(trace: str | None, tracing: Tracing) -> tuple[Context, int]:
    """The context and trace id a workflow's spans belong to.

    `trace` is the submitter's `traceparent`, or only a trace id when it sent none.
    """
    if trace and "-" in trace:
        context = _PROPAGATOR.extract({TRACEPARENT: trace})
        span = get_current_span(context).get_span_context()
        if span.is_valid:
            return context, span.trace_id
    if trace and len(trace) == 32:
        return Context(), int(trace, 16)
    return Context(), tracing.new_trace_id()


async def send(handler: Handler, request: Request, *, key: str, source: str,
               workflow: str | None, step: str | None, span_name: str, trace: str | None,
               tracing: Tracing, clock: Clock, want_body: bool) -> Result:
    """Send `request` through `handler` (the outbound stack) and judge the answer."""
    parent, trace_id = parent_of(trace, tracing)
    span = tracing.start_span(span_name, kind=SpanKind.INTERNAL, parent=parent, trace_id=trace_id)
    path, _, query = request.path.partition("?")
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Host"] = request.service
    headers[IDEMPOTENCY_KEY] = key
    data = b""
    if request.body is not None:
        data = json.dumps(request.body, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=set_span_in_context(span))
    headers.extend(carrier)
    call = Call(direction="outbound", method=request.method, path=path, query=query,
                headers=headers, body=Body(data=data), source=source, started=clock.monotonic(),
                absolute_host=request.service, workflow=workflow, step=step)
    # The call's one timer is this function's, as the edge's is the edge's:
    # made here, closed once the answer is read.
    timer = call.timed()
    try:
        try:
            reply = await handler(call)
        except BaseException:
            # Cancelled (the sidecar is stopping): the step resumes after the restart.
            span.set_attributes({"peer.service": request.service, "error.type": "cancelled"})
            span.set_status(Status(StatusCode.ERROR))
            span.end()
            raise
        body = None
        if want_body and 200 <= reply.status < 300:
            body = await _json_of(reply)
        else:
            reply.discard()
    finally:
        timer.close()
    retry = call.upstream.policy.retry if call.upstream is not None else RetryPolicy()
    result = Result(reply.status, reply.reason, call.attempts, retry, body)
    _finish(span, request.service, result)
    return result


def _finish(span: Any, service: str, result: Result) -> None:
    attributes: dict[str, str | int] = {"peer.service": service, "sidecar.target": service,
                                        "http.response.status_code": result.status}
    reason = reasons.known(result.reason)
    if reason is not None:
        attributes["sidecar.reason"] = reason
    if not result.ok:
        attributes["error.type"] = str(result.status)
        span.set_status(Status(StatusCode.ERROR))
    span.set_attributes(attributes)
    span.end()


async def _json_of(reply: Reply) -> Any:
    """The reply's JSON body (None if it is not JSON or too large); the reply is released."""
    try:
        if isinstance(reply.body, bytes):
            data = reply.body
        else:
            parts: list[bytes] = []
            size = 0
            try:
                async for chunk in reply.body:
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        return None
                    parts.append(chunk)
            except ConnectionResetError:
                return None  # the answer was cut: it still said 2xx
            data = b"".join(parts)
        if "json" not in reply.headers.get("Content-Type", ""):
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None
    finally:
        reply.discard()
