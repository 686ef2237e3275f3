"""Audit shipping: every record of the audit file, in order, at least once, to a collector.

`audit.ship: {service, path, batch, interval}`. The shipper reads the file the
audit log writes (only whole lines: what is on disk), posts
`{"sidecar": NAME, "records": [...]}` through the outbound stack, and moves
its cursor (byte offset and hash of the last record sent) in the workflow
store only once the collector has answered 2xx. A restart resumes from the
cursor: a batch acknowledged just before a crash is sent again, which the
collector sees as records whose hashes it already has. If the file was
rotated (the cursor's record is not where it was), the shipper finds that
record in the file or starts at the top of the new one.

The shipper's own POSTs are audited too, on both sides: those records go with
the next batch, and alone they wait `QUIET` intervals, so a quiet mesh does
not keep shipping the records of its own shipping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.clock import Clock
from sidecar.config.settings import AuditShip
from sidecar.stack import Handler
from sidecar.tasks import TaskGroup
from sidecar.telemetry.tracing import Tracing
from sidecar.workflows import calls, crash
from sidecar.workflows.model import Request
from sidecar.workflows.store import SqlStore

log = logging.getLogger("sidecar.audit.ship")

QUIET = 10  # intervals the records of shipping itself wait for company; and at most
MAX_DELAY = 30.0  # seconds (or QUIET intervals) between tries while the collector fails
TAIL = 64 * 1024  # bytes read back to find the record just before the cursor


@dataclass(frozen=True, slots=True)
class Cursor:
    offset: int
    hash: str | None

    def text(self) -> str:
        return f"{self.offset}:{self.hash or ''}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        if not text:
            return cls(0, None)
        offset, _, hash = text.partition(":")
        return cls(int(offset), hash or None)


@dataclass(frozen=True, slots=True)
class Batch:
    records: list[dict[str, Any]]
    end: int  # the offset after the batch's last line


def read_batch(path: Path, cursor: Cursor, limit: int) -> tuple[Cursor, Batch]:
    """Up to `limit` whole records after `cursor` (which is first checked, and
    re-found after a rotation); the cursor as it was found."""
    cursor = locate(path, cursor)
    records: list[dict[str, Any]] = []
    end = cursor.offset
    try:
        with open(path, "rb") as file:
            file.seek(cursor.offset)
            while len(records) < limit:
                line = file.readline()
                if not line.endswith(b"\n"):
                    break  # not all written yet
                end += len(line)
                try:
                    records.append(json.loads(line))
                except ValueError:
                    # Not a record (the verifier names the line); the chain shows the gap.
                    if line.strip():
                        log.warning("audit line that is not a record was not shipped")
    except FileNotFoundError:
        pass
    return cursor, Batch(records, end)


def locate(path: Path, cursor: Cursor) -> Cursor:
    """`cursor` if the record before it is the one it names, else where that record
    is in the file, else the start (a new file)."""
    if cursor.hash is None:
        return Cursor(0, None) if cursor.offset == 0 else cursor
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Cursor(0, None)
    if 0 < cursor.offset <= size and _hash_before(path, cursor.offset) == cursor.hash:
        return cursor
    offset = 0
    with open(path, "rb") as file:
        for line in file:
            offset += len(line)
            if line.endswith(b"\n") and _hash_of(line) == cursor.hash:
                return Cursor(offset, cursor.hash)
    log.warning("audit file rotated: shipping starts at its first record")
    return Cursor(0, None)


def _hash_before(path: Path, offset: int) -> str | None:
    with open(path, "rb") as file:
        start = max(0, offset - TAIL)
        file.seek(start)
        chunk = file.read(offset - start)
    lines = chunk.rstrip(b"\n").rsplit(b"\n", 1)
    return _hash_of(lines[-1])


def _hash_of(line: bytes) -> str | None:
    try:
        value = json.loads(line).get("hash")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class Shipper:
    """Ships one audit file; `start` and `close` bracket its background task."""

    def __init__(self, *, settings: AuditShip, audit_path: str, store: SqlStore,
                 handler: Handler, service: str, route: str, tracing: Tracing,
                 clock: Clock) -> None:
        self.settings = settings
        self.path = Path(audit_path)
        self.store = store
        self.shipped = 0  # records acknowledged since start
        self._handler = handler
        self._service = service
        self._route = route
        self._tracing = tracing
        self._clock = clock
        # One cursor per audit file: replicas sharing a store each ship their own.
        self._name = f"audit-ship:{socket.gethostname()}:{os.path.abspath(audit_path)}"
        self._tasks = TaskGroup()

    def start(self) -> None:
        self._tasks.start("audit-ship", self._run())

    async def close(self) -> None:
        await self._tasks.close()

    def is_shipping(self, record: dict[str, Any]) -> bool:
        """A record of shipping itself: a POST to the collector's path, either side."""
        if record.get("method") != "POST" or record.get("route") != self._route:
            return False
        collector = self.settings.service
        if record.get("direction") == "outbound":
            return record.get("target") == collector
        return record.get("target") == collector == self._service

    async def _run(self) -> None:
        interval = self.settings.interval
        cursor = Cursor.parse(await self._load())
        failures = 0
        idle = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                cursor, batch = await loop.run_in_executor(
                    None, read_batch, self.path, cursor, self.settings.batch)
                only_ours = all(self.is_shipping(record) for record in batch.records)
                if not batch.records or (only_ours and idle < QUIET):
                    idle += 1
                    await asyncio.sleep(interval)
                    continue
                if not await self._send(batch):
                    failures += 1
                    await asyncio.sleep(min(MAX_DELAY, QUIET * interval,
                                            interval * 2 ** min(failures, 10)))
                    continue
                crash.reach("after-ship")
                cursor = Cursor(batch.end, batch.records[-1].get("hash"))
                await self.store.set_cursor(self._name, cursor.text())
                self.shipped += len(batch.records)
                failures = idle = 0
                if len(batch.records) < self.settings.batch:
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("audit shipping failed; will retry", extra={"error": type(exc).__name__})
                await asyncio.sleep(min(MAX_DELAY, interval * 4))

    async def _load(self) -> str | None:
        while True:
            try:
                return await self.store.cursor(self._name)
            except Exception as exc:
                log.error("audit shipping cursor unreadable; will retry",
                          extra={"error": type(exc).__name__})
                await asyncio.sleep(MAX_DELAY)

    async def _send(self, batch: Batch) -> bool:
        body = {"sidecar": self._service, "records": batch.records}
        result = await calls.send(
            self._handler, Request(self.settings.service, "POST", self.settings.path, body),
            key=f"audit:{batch.records[-1].get('hash')}", source=self._service, workflow=None,
            step=None, span_name="audit ship", trace=None, tracing=self._tracing,
            clock=self._clock, want_body=False)
        if not result.ok:
            log.warning("audit collector did not take the batch; will retry",
                        extra={"peer": self.settings.service, "reason": result.why})
        return result.ok
