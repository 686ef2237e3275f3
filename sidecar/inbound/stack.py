"""The inbound stack: what happens to another sidecar's call before the app sees it.

    caller's sidecar ==> :15006 [this stack] --127.0.0.1--> app
"""

from __future__ import annotations

import aiohttp

from sidecar.audit import layer as audit
from sidecar.audit.log import AuditLog
from sidecar.clock import Clock
from sidecar.config.settings import Limits
from sidecar.http import guards, transport
from sidecar.identity.layers import verify_token
from sidecar.identity.tokens import Verifier
from sidecar.inbound import mtls
from sidecar.inbound.app import to_app
from sidecar.inbound.normalise import normalise_path
from sidecar.inbound.overload import InFlight, cap_in_flight
from sidecar.inbound.policy import Policy, authorize
from sidecar.inbound.ratelimit import RateLimits, limit_rate
from sidecar.resilience.deadline import hold_deadline
from sidecar.stack import Handler, Target, compose
from sidecar.telemetry import metrics, tracing
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing


def build(
    *,
    # What the process keeps across reloads:
    clock: Clock, session: aiohttp.ClientSession, audit_log: AuditLog, stats: Metrics,
    tracer: Tracing, rate_limits: RateLimits, in_flight: InFlight,
    # What one config decides:
    limits: Limits, service: str, verifier: Verifier, policy: Policy, app: Target,
    tls_mode: str, trust_domain: str | None, max_in_flight: int,
) -> Handler:
    return compose(
        # Counts every answer, refusals included: outermost.
        metrics.observe(metrics=stats, direction="inbound", clock=clock),
        # Every decision is audited, refusals included.
        audit.record_decision(log=audit_log, clock=clock),
        # Whatever escapes below is 500 internal_error, so the two above see an answer.
        guards.answer_internal_errors(),
        # The SERVER span continues the caller's trace; its context goes to the app.
        tracing.server_span(tracing=tracer),
        # In `strict`, plain text is 400 tls_required before anything of it is read.
        mtls.require_tls(mode=tls_mode, service=service),
        # No CONNECT tunnels, no asterisk form: 400 bad_request.
        guards.check_target(),
        # A header line over limits.max_header_line is refused: 431.
        guards.check_headers(max_header_line=limits.max_header_line),
        # The path the policy judges is the path the app gets: normalise first.
        normalise_path(routes=app.routes),
        # A body over limits.max_request_body is refused before the app sees it (413);
        # one that stalls for limits.idle_timeout ends the call (408).
        guards.check_body(max_request_body=limits.max_request_body),
        # Who is calling: a verified token, or 401. Sets x-source-service.
        verify_token(service=service, verifier=verifier,
                     is_public=policy.is_public),
        # The client certificate names the token's issuer, or 401: needs both, so here.
        mtls.match_peer(mode=tls_mode, trust_domain=trust_domain),
        # In-flight gauge per verified caller: after the token check names it.
        metrics.track_in_flight(metrics=stats, direction="inbound"),
        # May they: default deny when a policy is present, or 403.
        authorize(policy=policy),
        # Buckets per rule and caller, or 429: after authorize, so a refused caller
        # spends no token, and before the app's concurrency cap.
        limit_rate(limits=rate_limits),
        # No more than max_in_flight at the app, or 503 overloaded at once.
        cap_in_flight(in_flight=in_flight, max_in_flight=max_in_flight),
        # App failures become problem+json (503 connect failure, 504, 502).
        guards.answer_failures(who="the app"),
        # The one place inbound traffic goes; its settings are `defaults`.
        to_app(app=app),
        # The caller's x-sidecar-timeout-ms (what is left of its deadline) bounds the app call.
        hold_deadline(clock=clock),
        terminal=transport.send_to(session, max_message=limits.max_request_body),
    )
