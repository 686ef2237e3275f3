"""The one timestamp format, shared by the audit log and the JSON logs."""

from __future__ import annotations

from sidecar.clock import rfc3339_ms


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339_ms(1_704_164_645.678) == "2024-01-02T03:04:05.678Z"
    assert rfc3339_ms(1_700_000_000.0) == "2023-11-14T22:13:20.000Z"


def test_milliseconds_are_cut_not_rounded() -> None:
    assert rfc3339_ms(0.9996) == "1970-01-01T00:00:00.999Z"
