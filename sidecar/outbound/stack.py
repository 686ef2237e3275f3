"""The outbound stack: what happens to an app's call, in order. Read this file first.

    app --localhost:15001--> [this stack] ==> the target's sidecar (:15006)
"""

from __future__ import annotations

from sidecar.audit import layer as auditing
from sidecar.http import guards, transport
from sidecar.identity.layers import attach_token
from sidecar.outbound import routing
from sidecar.resilience import breaker, bulkhead, deadline, retry
from sidecar.resilience.pools import balance, chosen_endpoint
from sidecar.stack import Handler, compose
from sidecar.telemetry import metrics, tracing
from sidecar.wiring import Shared, Wiring


def build(shared: Shared, wiring: Wiring) -> Handler:
    config = wiring.config
    services = config.services
    policies = {name: service.policy for name, service in services.items()}
    return compose(
        # Counts every answer, refusals included: outermost.
        metrics.observe(metrics=shared.metrics, direction="outbound", clock=shared.clock),
        # Every app call is audited, routed or not; it sees the final answer.
        auditing.record_decision(log=shared.audit, clock=shared.clock),
        # Fixes the call's trace id before anything can answer (the audit needs it).
        tracing.trace_context(tracing=shared.tracing),
        # No CONNECT tunnels, no asterisk form: 400 bad_request.
        guards.check_target(),
        # A header line over limits.max_header_line never leaves: 431.
        guards.check_headers(max_header_line=config.limits.max_header_line),
        # Names the target or answers 404 no_route before anything is dialled.
        routing.route(targets=wiring.targets, local_hosts=wiring.local_hosts),
        # In-flight gauge per target: needs the target, so after routing.
        metrics.track_in_flight(metrics=shared.metrics, direction="outbound"),
        # A body over limits.max_request_body never leaves: 413.
        guards.check_body(max_request_body=config.limits.max_request_body),
        # Failures no inner layer answered become problem+json (503/502/504).
        guards.answer_failures(who=""),
        # One budget for the whole call: queueing, every attempt and every delay.
        deadline.deadline(timeout={n: p.timeout for n, p in policies.items()},
                          clock=shared.clock),
        # Per service; full -> 503 bulkhead_full at once. Outside retry so a
        # retry keeps its slot instead of queueing again.
        bulkhead.limit(bulkheads=shared.bulkheads, clock=shared.clock),
        # Idempotent or keyed calls only, jittered, within the deadline and budget.
        retry.retry(policies={n: p.retry for n, p in policies.items()},
                    budgets=shared.budgets, clock=shared.clock),
        # Inside retry so every attempt counts toward opening the circuit.
        breaker.guard(breakers=shared.breakers),
        # One CLIENT span per attempt that the breaker let through.
        tracing.client_span(tracing=shared.tracing),
        # A token for the target's audience on every attempt (cached per audience).
        attach_token(minter=lambda: wiring.minter),
        # Which endpoint this attempt goes to; its outcome feeds outlier ejection.
        balance(pools=shared.pools),
        # Bounds one attempt and tells the far sidecar how long it has.
        deadline.per_attempt(
            per_try_timeout={n: p.retry.per_try_timeout for n, p in policies.items()},
            in_mesh={n: s.mesh for n, s in services.items()},
            clock=shared.clock,
        ),
        terminal=transport.send_to(
            shared.session, chosen_endpoint,
            connect_timeout=lambda call: services[call.target].policy.connect_timeout,
        ),
    )
