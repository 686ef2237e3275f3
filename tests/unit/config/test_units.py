"""Durations and sizes as config writes them: a number with its unit."""

from __future__ import annotations

import pytest

from sidecar.config.units import parse_duration, parse_size


def test_units() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120
    assert parse_size("64KiB") == 65536
    for bad in ("10", "5 parsecs", 10):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("12XB")
