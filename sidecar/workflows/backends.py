"""`workflows.store` -> the store it names, opened."""

from __future__ import annotations

from sidecar.workflows.postgres import PostgresStore
from sidecar.workflows.sqlite import SqliteStore
from sidecar.workflows.store import SqlStore


async def open_store(url: str) -> SqlStore:
    """`sqlite://PATH` or `postgresql://...`, opened: schema made, claims of the dead freed."""
    store: SqlStore
    if url.startswith("sqlite://"):
        store = SqliteStore(url.removeprefix("sqlite://"))
    else:
        store = PostgresStore(url)
    await store.open()
    return store
