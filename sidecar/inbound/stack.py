"""The inbound stack: what happens to another sidecar's call before the app sees it.

    caller's sidecar ==> :15006 [this stack] --127.0.0.1--> app
"""

from __future__ import annotations

from sidecar.audit import layer as auditing
from sidecar.http import guards, transport
from sidecar.identity.layers import verify_token
from sidecar.inbound.normalise import normalise_path
from sidecar.inbound.policy import authorize
from sidecar.resilience.deadline import hold_deadline
from sidecar.stack import Handler, compose
from sidecar.telemetry import metrics, tracing
from sidecar.wiring import Shared, Wiring


def build(shared: Shared, wiring: Wiring) -> Handler:
    config = wiring.config
    app = config.inbound.app.rstrip("/")
    return compose(
        # Counts every answer, refusals included: outermost.
        metrics.observe(metrics=shared.metrics, direction="inbound", clock=shared.clock),
        # Every decision is audited, refusals included.
        auditing.record_decision(log=shared.audit, clock=shared.clock),
        # The SERVER span continues the caller's trace; its context goes to the app.
        tracing.server_span(tracing=shared.tracing),
        # No CONNECT tunnels, no asterisk form: 400 bad_request.
        guards.check_target(),
        # A header line over limits.max_header_line is refused: 431.
        guards.check_headers(max_header_line=config.limits.max_header_line),
        # The path the policy judges is the path the app gets: normalise first.
        normalise_path(routes=wiring.own_routes),
        # A body over limits.max_request_body is refused before the app sees it.
        guards.check_body(max_request_body=config.limits.max_request_body),
        # Who is calling: a verified token, or 401. Sets x-source-service.
        verify_token(service=config.service, verifier=wiring.verifier, policy=wiring.policy),
        # In-flight gauge per verified caller: after the token check names it.
        metrics.track_in_flight(metrics=shared.metrics, direction="inbound"),
        # May they: default deny when a policy is present, or 403.
        authorize(policy=wiring.policy),
        # App failures become problem+json (503 connect failure, 504, 502).
        guards.answer_failures(who="the app"),
        # The caller's x-sidecar-timeout-ms (what is left of its deadline) bounds the app call.
        hold_deadline(timeout=config.defaults.timeout, clock=shared.clock),
        terminal=transport.send_to(
            shared.session, lambda call: app,
            connect_timeout=lambda call: config.defaults.connect_timeout,
        ),
    )
