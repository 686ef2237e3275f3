"""Observability: spans (`tracing`), Prometheus metrics (`metrics`) and JSON logs (`logs`).

All three see a call only through PHI-safe values: the templated route,
service names, the normalised method, status codes and the sidecar's own
reason codes. Header values, query strings, raw paths, bodies and tokens
never reach them (SPEC "Audit log").
"""

from __future__ import annotations

from sidecar.http.problem import REASONS


def known_reason(reason: str | None) -> str | None:
    """A reason code telemetry may show: one of SPEC's codes, else None.

    A reason relayed from the far side arrives in a header; only a code from
    the fixed table is repeated, so no free text becomes a label or attribute.
    """
    return reason if reason in REASONS else None
