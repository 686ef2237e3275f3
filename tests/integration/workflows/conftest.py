"""What the workflow tests share: the ledger apps b, c and d, and `store_url`, with which
a test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.ledger import Ledger


@pytest.fixture
async def ledgers() -> AsyncIterator[list[Ledger]]:
    """Three ledger apps, b, c and d, writing one journal in the order effects happen."""
    journal: list[tuple[str, str, str]] = []
    started = [await Ledger(name, journal=journal).start() for name in ("b", "c", "d")]
    yield started
    for ledger in started:
        await ledger.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/wf.db"
    return str(request.getfixturevalue("pg_database"))
