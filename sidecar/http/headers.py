"""Header hygiene shared by both directions: hop-by-hop removal and sidecar-owned names."""

from __future__ import annotations

import functools
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


# What each header name seen so far is: its lower case, whether it is always
# dropped (hop-by-hop or a look-alike), and whether it is `x-sidecar-*`. Names
# repeat from one request to the next; the map is bounded, as names are the
# sender's to choose.
_NAMES: dict[str, tuple[str, bool, bool]] = {}
_NAMES_KEPT = 4096


def _name(name: str) -> tuple[str, bool, bool]:
    known = _NAMES.get(name)
    if known is None:
        lower = name.lower()
        known = (lower, lower in HOP_BY_HOP or looks_like_own(lower),
                 lower.startswith(SIDECAR_PREFIX))
        if len(_NAMES) < _NAMES_KEPT:
            _NAMES[name] = known
    return known


@functools.lru_cache(maxsize=64)
def _lowered(names: tuple[str, ...]) -> frozenset[str]:
    # The stacks pass constants: each set is made once.
    return frozenset(name.lower() for name in names)


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
    dropped = _lowered(drop if isinstance(drop, tuple) else tuple(drop))
    named = headers.getall("Connection", None)
    if named is not None:
        dropped = dropped | {
            token.strip().lower() for value in named for token in value.split(",")
        }
    kept = _lowered(keep if isinstance(keep, tuple) else tuple(keep))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower, always, sidecar = _name(name)
        if always or lower in dropped:
            continue
        if drop_sidecar and sidecar and lower not in kept:
            continue
        out.add(name, value)
    return out
