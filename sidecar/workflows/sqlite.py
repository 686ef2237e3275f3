"""The default store: one SQLite file in WAL mode, through aiosqlite (a thread of its own).

A file belongs to one sidecar process: an exclusive lock on `<file>.lock`,
held for the life of the process, says so, and a second process on the same
file refuses to start. That is also why, on opening, every claim left in the
file is freed: whoever held it has died. `synchronous=FULL` makes each commit
durable before the call it leads to goes out (write-ahead).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from sidecar.workflows.store import SCHEMA, Row, SqlStore, new_id

_PARAM = re.compile(r"\$(\d+)")


class StoreBusy(RuntimeError):
    """Another process holds this SQLite store."""


class _Tx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._db.execute(_PARAM.sub(r"?\1", sql), args)
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]:
        return list(await self._db.execute_fetchall(_PARAM.sub(r"?\1", sql), args))


class SqliteStore(SqlStore):
    """`sqlite://PATH`: one connection, one transaction at a time (`BEGIN IMMEDIATE`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.owner = f"sidecar-wf-{new_id()[:16]}"
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._lock_fd: int | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy(f"another process uses the workflow store {self.path}") from None
        self._lock_fd = fd
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        self._db = db
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
            await db.execute(f"PRAGMA {pragma}")
        async with self.write() as tx:
            for statement in SCHEMA:
                await tx.execute(statement)
            # The lock proves that whoever holds a claim here is gone.
            for table in ("wf_instances", "wf_deliveries"):
                await tx.execute(f"UPDATE {table} SET owner = NULL WHERE owner IS NOT NULL")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[_Tx]:
        assert self._db is not None, "store not open"
        db = self._db
        async with self._lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(db)
                # Shielded: a commit the thread has begun finishes even if we are cancelled.
                await asyncio.shield(db.execute("COMMIT"))
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(db.execute("ROLLBACK"))
                raise

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[_Tx]:
        assert self._db is not None, "store not open"
        async with self._lock:
            yield _Tx(self._db)
