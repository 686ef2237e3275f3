"""The clock every timing decision reads, injected so tests never sleep."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time for deadlines, wall time for tokens, and a sleep."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to; `sleep` advances it at once."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall - start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self.wall_offset

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()


def rfc3339_ms(epoch_seconds: float) -> str:
    """`2024-01-02T03:04:05.678Z`: UTC, milliseconds cut (not rounded); audit and logs alike."""
    seconds, millis = divmod(int(epoch_seconds * 1000), 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Every audit record and log line formats the time; within a second only
    # the milliseconds change.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
