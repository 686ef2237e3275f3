"""The audit layer: one hash-chained record per call decision, in both directions."""

from __future__ import annotations

import asyncio
import os
import re

from multidict import CIMultiDict

from sidecar import reasons
from sidecar.audit.log import AuditLog
from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.http.headers import TRACEPARENT
from sidecar.stack import Call, Handler, Layer, Reply, safe_method

# nginx's code for "the client closed the connection before the answer".
CLIENT_CLOSED = Reply(status=499, headers=CIMultiDict())
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(call: Call) -> str:
    """The call's trace id: from the tracing layers, else the incoming context, else new."""
    if call.trace is not None:
        return call.trace.trace_id_hex
    match = _TRACEPARENT.match(call.headers.get(TRACEPARENT, ""))
    if match and match.group(1) != "0" * 32:
        return match.group(1)
    return os.urandom(16).hex()


def write_record(log: AuditLog, call: Call, reply: Reply, *, clock: Clock = SYSTEM_CLOCK) -> None:
    """The audit record of `call` answered by `reply`.

    Records only templated routes, service names, SPIFFE IDs, codes and
    numbers: never a raw path, query, header value, certificate or body.
    """
    denied = reply.made_here and reasons.is_denial(reply.reason)
    log.record(
        direction=call.direction,
        source=call.source,
        target=call.target,
        method=safe_method(call.method),
        route=call.route,
        status=reply.status,
        decision="denied" if denied else "allowed",
        # A code of the table or null: a reason is never free text from outside.
        reason=reasons.known(reply.reason),
        duration_ms=(clock.monotonic() - call.started) * 1000,
        attempts=call.attempts,
        trace_id=trace_id(call),
        workflow=call.workflow,
        step=call.step,
        tls=call.tls,
        peer_id=call.peer_id,
    )


def record_decision(*, log: AuditLog, clock: Clock = SYSTEM_CLOCK) -> Layer:
    """Outermost but for metrics: writes the record after the answer is known,
    also when the caller went away (499). Inner failures arrive as replies
    (`guards.answer_internal_errors` sits inside)."""

    async def record_decision_layer(call: Call, next: Handler) -> Reply:
        try:
            reply = await next(call)
        except asyncio.CancelledError:
            # The caller went away before the answer: still one record, as 499.
            write_record(log, call, CLIENT_CLOSED, clock=clock)
            raise
        write_record(log, call, reply, clock=clock)
        return reply

    return record_decision_layer
