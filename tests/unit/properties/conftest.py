"""Hypothesis for the property tests: modest, so the unit suite stays fast.

No example database: a failure prints its example, and nothing is written
into the work tree.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sidecar",
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sidecar")
