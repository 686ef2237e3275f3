"""Where workflow state lives: one interface, a SQL schema, two backends.

Every transition the engine makes is one committed write here *before* the
call it leads to (write-ahead), so a process killed at any moment leaves a
state from which the work resumes. Work is claimed: a claimed row has an
`owner` and a `lease_until`; the owner renews its leases while it works, and
every write it makes is fenced by `owner`, so a replica that lost its claim
finds out before it sends anything. A claim is free again when its lease
passes or, on PostgreSQL, as soon as its owner's database sessions are gone
(a killed replica's connections close with it).

`SqlStore` holds the SQL both backends share (`$n` parameters; SQLite reads
them as `?n`); `sqlite.py` and `postgres.py` supply connections, the
transaction style and the claim query; `backends.open_store(url)` picks one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.workflows.model import (
    ACTIVE_STATES,
    DEAD,
    DELIVERED,
    FANOUT,
    PENDING,
    PURGEABLE,
    RUNNING,
    SAGA,
    Delivery,
    Fanout,
    FanoutDef,
    Saga,
    SagaDef,
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS wf_instances (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        idem_key TEXT,
        fingerprint TEXT NOT NULL,
        definition TEXT NOT NULL,
        progress TEXT NOT NULL,
        trace TEXT,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        finished DOUBLE PRECISION,
        next_at DOUBLE PRECISION NOT NULL,
        owner TEXT,
        lease_until DOUBLE PRECISION)""",
    """CREATE UNIQUE INDEX IF NOT EXISTS wf_instances_key
        ON wf_instances (kind, idem_key) WHERE idem_key IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS wf_instances_due ON wf_instances (state, next_at)",
    """CREATE TABLE IF NOT EXISTS wf_deliveries (
        id TEXT PRIMARY KEY,
        fanout TEXT NOT NULL,
        target TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        last_reason TEXT,
        failing_since DOUBLE PRECISION,
        rounds INTEGER NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        owner TEXT,
        lease_until DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS wf_deliveries_due ON wf_deliveries (status, next_at)",
    "CREATE INDEX IF NOT EXISTS wf_deliveries_fanout ON wf_deliveries (fanout)",
    "CREATE TABLE IF NOT EXISTS wf_cursors (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

INSTANCE_COLUMNS = "id, kind, state, definition, progress, trace, created, next_at"
DELIVERY_COLUMNS = ("id, fanout, target, status, attempts, last_reason, failing_since, rounds, "
                    "next_at")


class LostClaim(Exception):
    """This process no longer owns the row it tried to write: another took it over."""


class KeyReused(Exception):
    """An Idempotency-Key came back with a different definition."""


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...


class Tx(Protocol):
    """One transaction's statements; `$n` parameters."""

    async def execute(self, sql: str, *args: Any) -> int: ...  # rows changed

    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]: ...


@dataclass(frozen=True, slots=True)
class Counts:
    """For /admin/workflows: instances by kind and state, dead letters, the oldest running."""

    by_state: dict[str, dict[str, int]]
    dead_letters: int
    oldest_running: tuple[str, float] | None  # (id, created)


def fingerprint(definition: dict[str, Any]) -> str:
    text = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def new_id() -> str:
    return os.urandom(16).hex()


class SqlStore:
    """The store's operations over `Tx`; subclasses open connections and transactions.

    `owner` names this process in the claims it holds.
    """

    owner: str
    # Which claims are free: extended by PostgreSQL to claims whose owner is gone.
    stale_owner = "owner IS NULL OR lease_until < $1"
    # Appended to a claim's inner SELECT (PostgreSQL: FOR UPDATE SKIP LOCKED).
    claim_lock = ""

    def write(self) -> AbstractAsyncContextManager[Tx]:
        raise NotImplementedError

    def read(self) -> AbstractAsyncContextManager[Tx]:
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    # ---- creating

    async def create_saga(self, saga: Saga, *, key: str | None, now: float,
                          lease: float) -> tuple[str, bool]:
        """Store a new saga, claimed by this process; (id, True), or the id of the
        saga first made with `key` and False (KeyReused if its definition differs)."""
        return await self._create(SAGA, saga.id, saga.definition.to_json(),
                                  json.dumps(saga.progress_json()), saga.trace, key, now,
                                  lease, [])

    async def create_fanout(self, fanout: Fanout, deliveries: Sequence[Delivery], *,
                            key: str | None, now: float, lease: float) -> tuple[str, bool]:
        """Store a fan-out and its deliveries, each claimed by this process."""
        return await self._create(FANOUT, fanout.id, fanout.definition.to_json(), "[]",
                                  fanout.trace, key, now, lease, deliveries)

    async def _create(self, kind: str, id: str, definition: dict[str, Any], progress: str,
                      trace: str | None, key: str | None, now: float, lease: float,
                      deliveries: Sequence[Delivery]) -> tuple[str, bool]:
        printed = fingerprint(definition)
        async with self.write() as tx:
            made = await tx.fetch(
                "INSERT INTO wf_instances (id, kind, state, idem_key, fingerprint, definition,"
                " progress, trace, created, updated, next_at, owner, lease_until)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9, $10, $11)"
                " ON CONFLICT (kind, idem_key) WHERE idem_key IS NOT NULL DO NOTHING"
                " RETURNING id",
                id, kind, RUNNING, key, printed, json.dumps(definition), progress, trace, now,
                self.owner, now + lease)
            if not made:
                first = await tx.fetch(
                    "SELECT id, fingerprint FROM wf_instances WHERE kind = $1 AND idem_key = $2",
                    kind, key)
                if first[0]["fingerprint"] != printed:
                    raise KeyReused
                return str(first[0]["id"]), False
            for delivery in deliveries:
                await tx.execute(
                    "INSERT INTO wf_deliveries (id, fanout, target, status, attempts, rounds,"
                    " next_at, updated, owner, lease_until)"
                    " VALUES ($1, $2, $3, $4, 0, 0, $5, $5, $6, $7)",
                    delivery.id, id, delivery.target, PENDING, now, self.owner, now + lease)
        return id, True

    # ---- reading

    async def saga(self, id: str) -> Saga | None:
        async with self.read() as tx:
            rows = await tx.fetch(f"SELECT {INSTANCE_COLUMNS} FROM wf_instances"
                                  " WHERE id = $1 AND kind = $2", id, SAGA)
        return _saga(rows[0]) if rows else None

    async def fanout(self, id: str) -> tuple[Fanout, list[Delivery]] | None:
        async with self.read() as tx:
            rows = await tx.fetch(f"SELECT {INSTANCE_COLUMNS} FROM wf_instances"
                                  " WHERE id = $1 AND kind = $2", id, FANOUT)
            if not rows:
                return None
            deliveries = await tx.fetch(f"SELECT {DELIVERY_COLUMNS} FROM wf_deliveries"
                                        " WHERE fanout = $1 ORDER BY target", id)
        return _fanout(rows[0]), [_delivery(row) for row in deliveries]

    async def delivery(self, id: str) -> Delivery | None:
        async with self.read() as tx:
            rows = await tx.fetch(f"SELECT {DELIVERY_COLUMNS} FROM wf_deliveries WHERE id = $1",
                                  id)
        return _delivery(rows[0]) if rows else None

    async def dead_letters(self, limit: int = 1000) -> list[Delivery]:
        async with self.read() as tx:
            rows = await tx.fetch(f"SELECT {DELIVERY_COLUMNS} FROM wf_deliveries"
                                  " WHERE status = $1 ORDER BY updated LIMIT $2", DEAD, limit)
        return [_delivery(row) for row in rows]

    async def counts(self) -> Counts:
        async with self.read() as tx:
            rows = await tx.fetch("SELECT kind, state, COUNT(*) AS n FROM wf_instances"
                                  " GROUP BY kind, state")
            dead = await tx.fetch("SELECT COUNT(*) AS n FROM wf_deliveries WHERE status = $1",
                                  DEAD)
            oldest = await tx.fetch("SELECT id, created FROM wf_instances"
                                    " WHERE state IN ($1, $2) ORDER BY created LIMIT 1",
                                    *ACTIVE_STATES)
        by_state: dict[str, dict[str, int]] = {}
        for row in rows:
            by_state.setdefault(str(row["kind"]), {})[str(row["state"])] = int(row["n"])
        running = (str(oldest[0]["id"]), float(oldest[0]["created"])) if oldest else None
        return Counts(by_state, int(dead[0]["n"]), running)

    # ---- claiming

    async def claim_sagas(self, *, now: float, lease: float, limit: int) -> list[Saga]:
        """Active sagas that are due and free, now claimed by this process."""
        rows = await self._claim("wf_instances", "kind = $5 AND state IN ($6, $7)",
                                 INSTANCE_COLUMNS, now, lease, limit, SAGA, *ACTIVE_STATES)
        return [_saga(row) for row in rows]

    async def claim_deliveries(self, *, now: float, lease: float, limit: int) -> list[Delivery]:
        """Pending deliveries that are due and free, now claimed by this process."""
        rows = await self._claim("wf_deliveries", "status = $5", DELIVERY_COLUMNS, now, lease,
                                 limit, PENDING)
        return [_delivery(row) for row in rows]

    async def _claim(self, table: str, which: str, columns: str, now: float, lease: float,
                     limit: int, *args: Any) -> Sequence[Row]:
        """Rows of `table` matching `which` ($5 on) that are due and free, now ours."""
        async with self.write() as tx:
            return await tx.fetch(
                f"UPDATE {table} SET owner = $2, lease_until = $3 WHERE id IN ("
                f" SELECT id FROM {table} WHERE {which}"
                f" AND next_at <= $1 AND ({self.stale_owner})"
                f" ORDER BY next_at LIMIT $4{self.claim_lock})"
                f" RETURNING {columns}",
                now, self.owner, now + lease, limit, *args)

    async def renew(self, *, now: float, lease: float) -> None:
        """Push out the lease of every claim this process holds."""
        async with self.write() as tx:
            for table in ("wf_instances", "wf_deliveries"):
                await tx.execute(f"UPDATE {table} SET lease_until = $1 WHERE owner = $2",
                                 now + lease, self.owner)

    async def release_all(self) -> None:
        """Give up every claim (a clean stop), so the work resumes elsewhere at once."""
        async with self.write() as tx:
            for table in ("wf_instances", "wf_deliveries"):
                await tx.execute(f"UPDATE {table} SET owner = NULL WHERE owner = $1",
                                 self.owner)

    # ---- transitions (fenced by owner)

    async def save_saga(self, saga: Saga, *, now: float, release: bool = False) -> None:
        """Commit the saga's state and progress; LostClaim if it is no longer ours.

        `release` gives up the claim (the saga waits until `next_at`)."""
        async with self.write() as tx:
            changed = await tx.execute(
                "UPDATE wf_instances SET state = $1, progress = $2, updated = $3,"
                " finished = $4, next_at = $5,"
                " owner = CASE WHEN $6 THEN NULL ELSE owner END"
                " WHERE id = $7 AND owner = $8",
                saga.state, json.dumps(saga.progress_json()), now,
                None if not saga.finished else now, saga.next_at, release, saga.id, self.owner)
        if changed != 1:
            raise LostClaim(saga.id)

    async def save_delivery(self, delivery: Delivery, *, now: float,
                            release: bool = False) -> None:
        """Commit a delivery; when none of its fan-out is pending any more, the
        fan-out is `delivered` or `dead`. LostClaim if the delivery is not ours."""
        async with self.write() as tx:
            changed = await tx.execute(
                "UPDATE wf_deliveries SET status = $1, attempts = $2, last_reason = $3,"
                " failing_since = $4, rounds = $5, next_at = $6, updated = $7,"
                " owner = CASE WHEN $8 THEN NULL ELSE owner END"
                " WHERE id = $9 AND owner = $10",
                delivery.status, delivery.attempts, delivery.last_reason,
                delivery.failing_since, delivery.rounds, delivery.next_at, now, release,
                delivery.id, self.owner)
            if changed != 1:
                raise LostClaim(delivery.id)
            if delivery.status != PENDING:
                await self._settle(tx, delivery.fanout, now)

    async def _settle(self, tx: Tx, fanout: str, now: float) -> None:
        await tx.execute(
            "UPDATE wf_instances SET state = CASE WHEN EXISTS (SELECT 1 FROM wf_deliveries"
            " WHERE fanout = $1 AND status = $2) THEN $2 ELSE $3 END, finished = $4,"
            " updated = $4"
            " WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM wf_deliveries"
            " WHERE fanout = $1 AND status = $5)",
            fanout, DEAD, DELIVERED, now, PENDING)

    async def redrive(self, id: str, *, now: float) -> Delivery | None:
        """A dead letter pending again, due now; a pending one as it is; None otherwise."""
        async with self.write() as tx:
            rows = await tx.fetch(
                "UPDATE wf_deliveries SET status = $1, next_at = $2, failing_since = NULL,"
                " rounds = 0, updated = $2, owner = NULL WHERE id = $3 AND status = $4"
                f" RETURNING {DELIVERY_COLUMNS}", PENDING, now, id, DEAD)
            if rows:
                await tx.execute("UPDATE wf_instances SET state = $1, finished = NULL,"
                                 " updated = $2 WHERE id = $3", RUNNING, now, rows[0]["fanout"])
            else:
                rows = await tx.fetch(f"SELECT {DELIVERY_COLUMNS} FROM wf_deliveries"
                                      " WHERE id = $1 AND status = $2", id, PENDING)
        return _delivery(rows[0]) if rows else None

    # ---- retention and cursors

    async def purge(self, *, before: float) -> int:
        """Delete instances that finished before `before` and need nobody (PURGEABLE)."""
        removed = 0
        async with self.write() as tx:
            for kind, state in PURGEABLE:
                if kind == FANOUT:
                    await tx.execute(
                        "DELETE FROM wf_deliveries WHERE fanout IN (SELECT id FROM wf_instances"
                        " WHERE kind = $1 AND state = $2 AND finished < $3)", kind, state, before)
                removed += await tx.execute(
                    "DELETE FROM wf_instances WHERE kind = $1 AND state = $2 AND finished < $3",
                    kind, state, before)
        return removed

    async def cursor(self, name: str) -> str | None:
        async with self.read() as tx:
            rows = await tx.fetch("SELECT value FROM wf_cursors WHERE name = $1", name)
        return str(rows[0]["value"]) if rows else None

    async def set_cursor(self, name: str, value: str) -> None:
        async with self.write() as tx:
            await tx.execute("INSERT INTO wf_cursors (name, value) VALUES ($1, $2)"
                             " ON CONFLICT (name) DO UPDATE SET value = $2", name, value)


def _saga(row: Row) -> Saga:
    return Saga(id=str(row["id"]), definition=SagaDef.from_json(json.loads(row["definition"])),
                steps=Saga.steps_from_json(json.loads(row["progress"])), state=str(row["state"]),
                trace=row["trace"], created=float(row["created"]), next_at=float(row["next_at"]))


def _fanout(row: Row) -> Fanout:
    return Fanout(id=str(row["id"]), definition=FanoutDef.from_json(json.loads(row["definition"])),
                  state=str(row["state"]), trace=row["trace"], created=float(row["created"]))


def _delivery(row: Row) -> Delivery:
    return Delivery(id=str(row["id"]), fanout=str(row["fanout"]), target=str(row["target"]),
                    status=str(row["status"]), attempts=int(row["attempts"]),
                    last_reason=row["last_reason"], failing_since=row["failing_since"],
                    rounds=int(row["rounds"]), next_at=float(row["next_at"]))
