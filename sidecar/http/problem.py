"""RFC 9457 problem+json answers: every response the sidecar makes itself.

Nothing from the request is ever echoed here: `detail` is built from service
names, limits and advice only.
"""

from __future__ import annotations

import json

from multidict import CIMultiDict

from sidecar.http.headers import REASON
from sidecar.reasons import REASONS
from sidecar.stack import Reply

TYPE_BASE = "https://sidecar.dev/problems/"


def body(reason: str, detail: str) -> bytes:
    row = REASONS[reason]
    doc = {
        "type": TYPE_BASE + reason.replace("_", "-"),
        "title": row.title,
        "status": row.status,
        "detail": detail,
        "reason": reason,
    }
    return json.dumps(doc).encode()


def reply(reason: str, detail: str, *, headers: dict[str, str] | None = None) -> Reply:
    """The sidecar's own answer for `reason` (a code of `sidecar.reasons`)."""
    out: CIMultiDict[str] = CIMultiDict()
    out["Content-Type"] = "application/problem+json"
    out[REASON] = reason
    if headers:
        out.update(headers)
    return Reply(status=REASONS[reason].status, headers=out, body=body(reason, detail),
                 reason=reason, made_here=True)
