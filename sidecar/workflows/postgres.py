"""A store for several replicas of one service, or a sidecar without a durable disk.

asyncpg, a small pool whose connections all carry this process's claim name
as `application_name`. Claims are taken with `FOR UPDATE SKIP LOCKED`, so
two replicas polling at once never take the same row, and a claim is free
again as soon as its owner has no session left in `pg_stat_activity` (a
replica killed with SIGKILL loses its connections at once) or its lease has
passed. Idle connections are never closed by the pool: an owner without a
session would look dead to the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from sidecar.workflows.store import SCHEMA, Row, SqlStore, new_id

POOL_SIZE = 4
STATEMENT_TIMEOUT = 10.0  # seconds; a store that hangs must not hold a step forever
SCHEMA_LOCK = 0x5C1DECA7  # serialises CREATE TABLE IF NOT EXISTS between replicas starting


class _Tx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(sql, *args)
        last = str(status).rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]:
        return list(await self._conn.fetch(sql, *args))


class PostgresStore(SqlStore):
    """`postgresql://user@host/db` (password from the URL or PGPASSWORD)."""

    stale_owner = (
        "owner IS NULL OR lease_until < $1"
        " OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = owner)"
    )
    claim_lock = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self.url = url
        self.owner = f"sidecar-wf-{new_id()[:16]}"
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=POOL_SIZE, max_inactive_connection_lifetime=0,
            command_timeout=STATEMENT_TIMEOUT, server_settings={"application_name": self.owner},
        )
        async with self.write() as tx:
            await tx.fetch("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            for statement in SCHEMA:
                await tx.execute(statement)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[_Tx]:
        assert self._pool is not None, "store not open"
        async with self._pool.acquire() as conn, conn.transaction():
            yield _Tx(conn)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[_Tx]:
        assert self._pool is not None, "store not open"
        async with self._pool.acquire() as conn:
            yield _Tx(conn)
