"""The one table of reason codes (SPEC "Errors the sidecar makes").

Each code is one row: its status, its title, whether it is this sidecar's
refusal of the call (the audit's `decision: denied`), and whether it reports
a failure of the upstream (retry, breaker, outlier detection and metrics
count those; the sidecar's own refusals say nothing about the upstream's
health). `problem`, `auditing`, `classify`, `metrics`, `guards` and
`websocket` all read this table; nothing else writes a reason's status or
title.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    status: int
    title: str
    denial: bool = False  # this sidecar refused the call (audit `decision: denied`)
    upstream_failure: bool = False  # the upstream failed (a made-here refusal is not one)


_ROWS = (
    Reason("no_route", 404, "No route to service", denial=True),
    Reason("token_missing", 401, "Service token missing", denial=True),
    Reason("token_invalid", 401, "Service token invalid", denial=True),
    Reason("policy_denied", 403, "Denied by authorization policy", denial=True),
    Reason("circuit_open", 503, "Circuit open", denial=True),
    Reason("bulkhead_full", 503, "Too many calls in flight", denial=True),
    Reason("upstream_connect_failure", 503, "Upstream connect failure", upstream_failure=True),
    Reason("upstream_timeout", 504, "Upstream timeout", upstream_failure=True),
    Reason("upstream_reset", 502, "Upstream reset", upstream_failure=True),
    Reason("bad_request", 400, "Bad request", denial=True),
    Reason("headers_too_large", 431, "Request headers too large", denial=True),
    Reason("body_too_large", 413, "Request body too large", denial=True),
    # Not in SPEC's table: a request body that stopped moving (Envoy's stream idle timeout).
    Reason("body_stalled", 408, "Request body stalled", denial=True),
    # SPEC "Encryption in transit" and "Rate limits (inbound)":
    Reason("tls_required", 400, "TLS required", denial=True),
    Reason("peer_identity_mismatch", 401, "Peer identity mismatch", denial=True),
    # Refused before any byte was sent, and a sign of a wrong endpoint: both.
    Reason("upstream_identity_mismatch", 502, "Upstream identity mismatch", denial=True,
           upstream_failure=True),
    Reason("rate_limited", 429, "Rate limited", denial=True),
    Reason("overloaded", 503, "Overloaded", denial=True),
    # Not in SPEC's table: the last-resort answer when the sidecar itself failed.
    Reason("internal_error", 500, "Internal error"),
    # Not in SPEC's table: the sidecar's own API (`/_sidecar/v1/`).
    Reason("not_found", 404, "No such workflow resource"),
    Reason("method_not_allowed", 405, "Method not allowed", denial=True),
)

REASONS: Mapping[str, Reason] = MappingProxyType({row.code: row for row in _ROWS})

# How a failure that no upstream answered is told to the app (the transport's
# and the timers' `UpstreamError.kind`).
FAILURE_REASONS: Mapping[str, str] = MappingProxyType({
    "connect-failure": "upstream_connect_failure",
    "reset": "upstream_reset",
    "bad-response": "upstream_reset",
    "timeout": "upstream_timeout",
    "per-try-timeout": "upstream_timeout",
    "identity-mismatch": "upstream_identity_mismatch",
})


def known(code: str | None) -> str | None:
    """`code` if it is one of the table's codes, else None.

    A reason relayed from the far side arrives in a header; only a code from
    the table is repeated, so no free text becomes a label, an attribute or
    an audit field.
    """
    return code if code in REASONS else None


def relayed(code: str | None, *, mesh: bool) -> str | None:
    """The reason an upstream's `x-sidecar-reason` may pass on as, or None.

    Only a mesh target has a sidecar that speaks for it: an app (inbound) or a
    `mesh: false` service may write any text there, and even a mesh endpoint
    is taken at its word for a code of the table only, never for free text.
    """
    return known(code) if mesh else None


def is_denial(code: str | None) -> bool:
    row = REASONS.get(code or "")
    return row is not None and row.denial


def is_local_refusal(code: str | None) -> bool:
    """A made-here answer with this code asked no upstream: not an upstream failure."""
    row = REASONS.get(code or "")
    return row is not None and not row.upstream_failure
