"""The outbound stack: what happens to an app's call, in order. Read this file first.

    app --localhost:15001--> [this stack] ==> the target's sidecar (:15006)
"""

from __future__ import annotations

from sidecar import auditing, guards, transport
from sidecar.identity.layers import attach_token
from sidecar.outbound import routing
from sidecar.resilience import breaker, deadline, retry
from sidecar.runtime_types import Shared, Wiring
from sidecar.stack import Handler, compose


def build(shared: Shared, wiring: Wiring) -> Handler:
    config = wiring.config
    policies = {name: service.policy for name, service in config.services.items()}
    return compose(
        # Every app call is audited, routed or not; outermost so the record
        # sees the final answer, whoever made it.
        auditing.record_decision(log=shared.audit, clock=shared.clock),
        # Names the target or answers 404 no_route before anything is dialled.
        routing.route(targets=wiring.targets, local_hosts=wiring.local_hosts),
        # A body over limits.max_request_body never leaves: 413.
        guards.check_body(max_request_body=config.limits.max_request_body),
        # Failures no inner layer answered become problem+json (503/502/504).
        guards.answer_failures(who=""),
        # One budget for the whole call, retries and waits included.
        deadline.deadline(timeout={n: p.timeout for n, p in policies.items()},
                          clock=shared.clock),
        # Retries: idempotent or keyed calls only, jittered, within deadline and budget.
        retry.retry(policies={n: p.retry for n, p in policies.items()},
                    budgets=shared.budgets, clock=shared.clock),
        # Inside retry so every attempt counts toward opening the circuit.
        breaker.guard(breakers=shared.breakers),
        # A fresh token for the target's audience on every attempt (cached).
        attach_token(minter=lambda: wiring.minter),
        # Bounds one attempt and tells the far sidecar how long it has.
        deadline.per_attempt(
            per_try_timeout={n: p.retry.per_try_timeout for n, p in policies.items()},
            in_mesh={n: s.mesh for n, s in config.services.items()},
            clock=shared.clock,
        ),
        terminal=transport.send_to(
            shared.session,
            lambda call: config.services[call.target].endpoints[0],
            connect_timeout=lambda call: config.services[call.target].policy.connect_timeout,
        ),
    )
