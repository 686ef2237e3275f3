"""Header hygiene shared by both directions: hop-by-hop removal and sidecar-owned names."""

from __future__ import annotations

import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1 and the classic hop-by-hop set; every name listed in
# `Connection` is removed as well.
HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})
TOKEN = "x-service-token"
SOURCE = "x-source-service"
REASON = "x-sidecar-reason"
ATTEMPTS = "x-sidecar-attempts"
TIMEOUT_MS = "x-sidecar-timeout-ms"
SIDECAR_PREFIX = "x-sidecar-"
# Standard headers whose meaning the sidecar acts on.
IDEMPOTENCY_KEY = "Idempotency-Key"
RETRY_AFTER = "Retry-After"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"

# In a header name, every character but a letter, digit or `-`: CGI and WSGI
# servers turn `-` into `_`, so to the app `x_source_service` is `x-source-service`.
_SEPARATORS = re.compile(r"[^a-z0-9-]")


def looks_like_own(lower: str) -> bool:
    """True if the lower-case header name `lower` is not one of the sidecar's
    own names but reads as one with its `_` (or other separators) as `-`.

    Such a header is dropped wherever headers cross the sidecar, either way
    (Envoy's `headers_with_underscores_action` for these names): otherwise
    `x_source_service: svc-c` reaches the app beside the verified caller.
    """
    if not lower.startswith("x") or not _SEPARATORS.search(lower):
        return False
    dashed = _SEPARATORS.sub("-", lower)
    return dashed in (TOKEN, SOURCE) or dashed.startswith(SIDECAR_PREFIX)


def forwardable(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    drop: Iterable[str] = (),
    drop_sidecar: bool = True,
    keep: Iterable[str] = (),
) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones, without `drop`, without
    look-alikes of the sidecar's own names (`looks_like_own`), and, unless
    `drop_sidecar` is false, without any `x-sidecar-*` other than those in `keep`."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    dropped = HOP_BY_HOP | named | {d.lower() for d in drop}
    kept = {k.lower() for k in keep}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in dropped or looks_like_own(lower):
            continue
        if drop_sidecar and lower.startswith(SIDECAR_PREFIX) and lower not in kept:
            continue
        out.add(name, value)
    return out
