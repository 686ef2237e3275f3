"""Durations and sizes with units, as the config writes them (`250ms`, `64KiB`)."""

from __future__ import annotations

import re

# ASCII digits only (`\d` alone would take Arabic-Indic `10s`), and at most 15
# of them, so a value is finite (15 digits of seconds are 31 million years).
_DURATION = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*(ms|s|m|h|d)\s*$", re.ASCII)
_RATE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*/\s*(s|m|h)\s*$", re.ASCII)
_SIZE = re.compile(r"^\s*(\d{1,15})\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$", re.ASCII)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTES = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}


def parse_duration(text: object) -> float:
    """`'250ms'` -> 0.25. A bare number is refused: the unit must be said."""
    if not isinstance(text, str):
        raise ValueError("must be a duration string with a unit, such as 250ms, 5s or 2m")
    match = _DURATION.match(text)
    if not match:
        raise ValueError("must be a duration with a unit (ms, s, m, h, d), such as 250ms or 5s")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_size(text: object) -> int:
    """`'64KiB'` -> 65536. A bare integer is taken as bytes."""
    if isinstance(text, bool):
        raise ValueError("must be a size such as 64KiB or 10MiB")
    if isinstance(text, int):
        if not 0 <= text < 10**15:
            raise ValueError("must be a number of bytes from 0 to below 1e15")
        return text
    if not isinstance(text, str):
        raise ValueError("must be a size such as 64KiB or 10MiB")
    match = _SIZE.match(text)
    if not match:
        raise ValueError("must be a size with a unit (B, KiB, MiB, GiB), such as 64KiB")
    return int(match.group(1)) * _BYTES[match.group(2)]


def parse_rate(text: object) -> float:
    """`'500/s'` -> 500.0 a second; `'30/m'` -> 0.5. The unit must be said."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError("must be a rate such as 100/s, 600/m or 1000/h")
    per_second = float(match.group(1)) / _SECONDS[match.group(2)]
    if per_second <= 0:
        raise ValueError("must be more than zero")
    return per_second
