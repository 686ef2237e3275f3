"""The audit layer: one hash-chained record per call decision, in both directions."""

from __future__ import annotations

import asyncio
import os
import re

from multidict import CIMultiDict

from sidecar.audit.log import AuditLog
from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.stack import Call, Handler, Layer, Reply, safe_method

# Answers that are this sidecar's own refusal of the call.
DENIALS = frozenset({
    "no_route", "token_missing", "token_invalid", "policy_denied", "circuit_open",
    "bulkhead_full", "bad_request", "headers_too_large", "body_too_large",
})
# nginx's code for "the client closed the connection before the answer".
CLIENT_CLOSED = Reply(status=499, headers=CIMultiDict())
FAILED_HERE = Reply(status=500, headers=CIMultiDict())
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(call: Call) -> str:
    """The call's trace id: from the tracing layers, else the incoming context, else new."""
    known = call.notes.get("trace_id")
    if known:
        return str(known)
    match = _TRACEPARENT.match(call.headers.get("traceparent", ""))
    if match and match.group(1) != "0" * 32:
        return match.group(1)
    return os.urandom(16).hex()


def write_record(log: AuditLog, call: Call, reply: Reply, *, clock: Clock = SYSTEM_CLOCK) -> None:
    """The audit record of `call` answered by `reply`.

    Records only templated routes, service names, codes and numbers: never a
    raw path, query, header value or body.
    """
    denied = reply.made_here and reply.reason in DENIALS
    log.record(
        direction=call.direction,
        source=call.source,
        target=call.target,
        method=safe_method(call.method),
        route=call.route,
        status=reply.status,
        decision="denied" if denied else "allowed",
        reason=reply.reason,
        duration_ms=(clock.monotonic() - call.started) * 1000,
        attempts=call.attempts,
        trace_id=trace_id(call),
    )


def record_decision(*, log: AuditLog, clock: Clock = SYSTEM_CLOCK) -> Layer:
    """Outermost but for metrics: writes the record after the answer is known,
    also when the caller went away (499) or nothing answered (500)."""

    async def record_decision_layer(call: Call, next: Handler) -> Reply:
        try:
            reply = await next(call)
        except asyncio.CancelledError:
            # The caller went away before the answer: still one record, as 499.
            write_record(log, call, CLIENT_CLOSED, clock=clock)
            raise
        except Exception:
            # Nothing answered it but the server's last resort: still one record.
            write_record(log, call, FAILED_HERE, clock=clock)
            raise
        write_record(log, call, reply, clock=clock)
        return reply

    return record_decision_layer
