"""RFC 9457 problem+json answers: every response the sidecar makes itself.

Nothing from the request is ever echoed here: `detail` is built from service
names, limits and advice only.
"""

from __future__ import annotations

import json

from multidict import CIMultiDict

from sidecar.stack import Reply

REASONS: dict[str, tuple[int, str]] = {
    "no_route": (404, "No route to service"),
    "token_missing": (401, "Service token missing"),
    "token_invalid": (401, "Service token invalid"),
    "policy_denied": (403, "Denied by authorization policy"),
    "circuit_open": (503, "Circuit open"),
    "bulkhead_full": (503, "Too many calls in flight"),
    "upstream_connect_failure": (503, "Upstream connect failure"),
    "upstream_timeout": (504, "Upstream timeout"),
    "upstream_reset": (502, "Upstream reset"),
    "bad_request": (400, "Bad request"),
    "headers_too_large": (431, "Request headers too large"),
    "body_too_large": (413, "Request body too large"),
}

TYPE_BASE = "https://sidecar.dev/problems/"
REASON_HEADER = "x-sidecar-reason"


def body(reason: str, detail: str) -> bytes:
    status, title = REASONS[reason]
    doc = {
        "type": TYPE_BASE + reason.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "reason": reason,
    }
    return json.dumps(doc).encode()


def reply(reason: str, detail: str, *, headers: dict[str, str] | None = None) -> Reply:
    """The sidecar's own answer for `reason`."""
    status, _ = REASONS[reason]
    out: CIMultiDict[str] = CIMultiDict()
    out["Content-Type"] = "application/problem+json"
    out[REASON_HEADER] = reason
    if headers:
        out.update(headers)
    return Reply(status=status, headers=out, body=body(reason, detail), reason=reason,
                 made_here=True)
