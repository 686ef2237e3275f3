"""Observability: spans (`tracing`), Prometheus metrics (`metrics`) and JSON logs (`logs`).

All three see a call only through PHI-safe values: the templated route,
service names, the normalised method, status codes and the sidecar's own
reason codes. Header values, query strings, raw paths, bodies and tokens
never reach them (SPEC "Audit log").
"""
