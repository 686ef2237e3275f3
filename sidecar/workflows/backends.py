"""`workflows.store` -> the store it names, opened.

Each driver is imported only when a store of its kind is opened: a sidecar
without workflows (most of them) never loads aiosqlite or asyncpg, which
would add about 5 MiB to every sidecar's memory.
"""

from __future__ import annotations

from sidecar.workflows.store import SqlStore


async def open_store(url: str) -> SqlStore:
    """`sqlite://PATH` or `postgresql://...`, opened: schema made, claims of the dead freed."""
    store: SqlStore
    if url.startswith("sqlite://"):
        from sidecar.workflows.sqlite import SqliteStore

        store = SqliteStore(url.removeprefix("sqlite://"))
    else:
        from sidecar.workflows.postgres import PostgresStore

        store = PostgresStore(url)
    await store.open()
    return store
