"""Fixtures the unit tests share: a fake clock, and the event loop's timers on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def loop_on(clock: FakeClock) -> AsyncIterator[FakeClock]:
    """Runs the event loop's timers on the fake clock, so timeouts fire without waiting."""
    loop = asyncio.get_running_loop()
    real_time = loop.time
    loop.time = clock.monotonic  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        loop.time = real_time  # type: ignore[method-assign]
