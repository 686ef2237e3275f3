"""The outbound stack: what happens to an app's call, in order. Read this file first.

    app --localhost:15001--> [this stack] ==> the target's sidecar (:15006)

Every layer below `routing.route` reads its per-service settings from the
routed target, `call.upstream`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import aiohttp

from sidecar.audit import layer as audit
from sidecar.audit.log import AuditLog
from sidecar.clock import Clock
from sidecar.config.settings import Limits
from sidecar.http import guards, transport
from sidecar.identity.layers import attach_token
from sidecar.identity.tokens import Minter
from sidecar.outbound import routing
from sidecar.outbound.dial import dial_tls
from sidecar.resilience import breaker, bulkhead, deadline, retry
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.bulkhead import Bulkheads
from sidecar.resilience.pools import Pools, balance
from sidecar.stack import Handler, Target, compose
from sidecar.telemetry import metrics, tracing
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing
from sidecar.tls.material import MeshTLS


def build(
    *,
    # What the process keeps across reloads:
    clock: Clock, session: aiohttp.ClientSession, audit_log: AuditLog, stats: Metrics,
    tracer: Tracing, bulkheads: Bulkheads, budgets: RetryBudgets, breakers: Breakers,
    pools: Pools, mesh_tls: MeshTLS | None,
    # What one config decides:
    limits: Limits, targets: Mapping[str, Target], local_hosts: frozenset[str], minter: Minter,
    # The sidecar's own API (`/_sidecar/v1/`), when workflows are configured:
    api: Handler | None = None,
    outside_tls: Mapping[str, ssl.SSLContext],
) -> Handler:
    return compose(
        # Counts every answer, refusals included: outermost.
        metrics.observe(metrics=stats, direction="outbound", clock=clock),
        # Every app call is audited, routed or not; it sees the final answer.
        audit.record_decision(log=audit_log, clock=clock),
        # Whatever escapes below is 500 internal_error, so the two above see an answer.
        guards.answer_internal_errors(),
        # Fixes the call's trace id before anything can answer (the audit needs it).
        tracing.trace_context(tracing=tracer),
        # No CONNECT tunnels, no asterisk form: 400 bad_request.
        guards.check_target(),
        # A header line over limits.max_header_line never leaves: 431.
        guards.check_headers(max_header_line=limits.max_header_line),
        # The sidecar's own API answers before routing, for its own host forms only.
        *([routing.sidecar_api(api=api, local_hosts=local_hosts)] if api is not None else []),
        # Names the target or answers 404 no_route before anything is dialled.
        routing.route(targets=targets, local_hosts=local_hosts),
        # In-flight gauge per target: needs the target, so after routing.
        metrics.track_in_flight(metrics=stats, direction="outbound"),
        # A body over limits.max_request_body never leaves: 413; one that stalls
        # for limits.idle_timeout: 408.
        guards.check_body(max_request_body=limits.max_request_body),
        # Failures no inner layer answered become problem+json (503/502/504).
        guards.answer_failures(who=""),
        # One budget for the whole call: queueing, every attempt and every delay.
        deadline.deadline(clock=clock),
        # Per service; full -> 503 bulkhead_full at once. Outside retry so a
        # retry keeps its slot instead of queueing again.
        bulkhead.limit(bulkheads=bulkheads, clock=clock),
        # Idempotent or keyed calls only, jittered, within the deadline and budget.
        retry.retry(budgets=budgets, clock=clock),
        # Inside retry so every attempt counts toward opening the circuit.
        breaker.guard(breakers=breakers),
        # One CLIENT span per attempt that the breaker let through.
        tracing.client_span(tracing=tracer),
        # A token for the target's audience on every attempt (cached per audience).
        attach_token(minter=minter),
        # Which endpoint this attempt goes to; its outcome feeds outlier ejection.
        balance(pools=pools),
        # Mesh TLS for that endpoint: its certificate must name the target, or 502.
        dial_tls(mesh=mesh_tls, outside=outside_tls),
        # Bounds one attempt and tells the far sidecar how long it has.
        deadline.per_attempt(clock=clock),
        terminal=transport.send_to(session, max_message=limits.max_request_body),
    )
