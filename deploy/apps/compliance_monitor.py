"""compliance-monitor: keeps the compliance event trail and the mesh's audit records.

    POST /events   {"kind": "...", ...}  -> 202 {"event_id": N, ...}
    GET  /events                          -> 200 {"events": [...]}
    POST /audit/records {"sidecar": NAME, "records": [...]}  -> 200 {"accepted": N, "known": M}
    GET  /audit/chains                    -> 200 {"chains": {NAME: {"records", "intact", ...}}}

Events come from the other apps' sidecars (a fan-out, so none is lost while
this service is down), each with an `Idempotency-Key`: an event sent again
is stored once. Each stored event keeps the caller the sidecar verified
(`x-source-service`), so the trail shows who reported what.

Audit records come from every sidecar's audit shipping (`audit.ship`), at
least once and in order. A record already held (same hash) is counted and
dropped; each new one must hash as SPEC says (SHA-256 of the record without
`hash`, sorted keys, no spaces, UTF-8) and link to a record already held
(`prev_hash`), or start a chain (64 zeros, or the first record heard from
that sidecar). `GET /audit/chains` says whether each sidecar's chain holds.
Everything lives in memory: events the newest 1000, records the newest 100,000
per sidecar.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from deploy.apps.common import AppSettings, bad_request, base_app, json_object, reply, run, seen

NAME = "compliance-monitor"
KEPT_EVENTS = 1000
KEPT_RECORDS = 100_000
GENESIS = "0" * 64


class EventLog:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.events: deque[dict[str, Any]] = deque(maxlen=KEPT_EVENTS)
        self.by_key: dict[str, dict[str, Any]] = {}

    def add(self, event: dict[str, Any], key: str | None = None) -> tuple[dict[str, Any], bool]:
        """The stored event, and whether it is new (False: this key was seen before)."""
        if key and key in self.by_key:
            return self.by_key[key], False
        stored = {"event_id": next(self._ids), **event}
        self.events.append(stored)
        if key:
            self.by_key[key] = stored
        return stored, True


def record_hash(record: dict[str, Any]) -> str:
    """SPEC's audit hash: SHA-256 of the record without `hash`, sorted keys, no spaces."""
    body = {key: value for key, value in record.items() if key != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Chain:
    """One sidecar's shipped records, deduplicated, in the order they came."""

    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT_RECORDS))
    hashes: set[str] = field(default_factory=set)
    received: int = 0  # every record sent, duplicates included
    problems: list[str] = field(default_factory=list)

    def add(self, record: Any) -> bool:
        self.received += 1
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            self.problems.append(f"record {self.received}: not an audit record")
            return False
        if record["hash"] in self.hashes:
            return False  # at least once: this one came before
        if record_hash(record) != record["hash"]:
            self.problems.append(f"record {self.received}: hash does not match (edited)")
        elif self.hashes and record.get("prev_hash") not in self.hashes | {GENESIS}:
            self.problems.append(f"record {self.received}: links to no record held "
                                 "(missing or out of order)")
        self.hashes.add(record["hash"])
        self.records.append(record)
        return True

    def summary(self) -> dict[str, Any]:
        return {"records": len(self.hashes), "received": self.received,
                "intact": not self.problems, "problems": self.problems[:10]}


@dataclass
class AuditTrail:
    chains: dict[str, Chain] = field(default_factory=dict)

    def take(self, sidecar: str, records: list[Any]) -> tuple[int, int]:
        """(new records, records already held)."""
        chain = self.chains.setdefault(sidecar, Chain())
        new = sum(chain.add(record) for record in records)
        return new, len(records) - new


EVENTS = web.AppKey("events", EventLog)
TRAIL = web.AppKey("trail", AuditTrail)


async def record_event(request: web.Request) -> web.Response:
    body = await json_object(request)
    kind = body.get("kind")
    if not isinstance(kind, str) or not kind:
        raise bad_request("an event needs a kind")
    caller = seen(request)
    stored, new = request.app[EVENTS].add(
        {**body, "reported_by": caller["source_service"], "trace_id": caller["trace_id"]},
        key=request.headers.get("Idempotency-Key"),
    )
    return reply(request, {"accepted": True, "event_id": stored["event_id"], "replayed": not new},
                 status=202)


async def list_events(request: web.Request) -> web.Response:
    return reply(request, {"events": list(request.app[EVENTS].events)})


async def take_records(request: web.Request) -> web.Response:
    body = await json_object(request)
    sidecar, records = body.get("sidecar"), body.get("records")
    if not isinstance(sidecar, str) or not sidecar or not isinstance(records, list):
        raise bad_request("expected {\"sidecar\": NAME, \"records\": [...]}")
    new, known = request.app[TRAIL].take(sidecar, records)
    return web.json_response({"accepted": new, "known": known})


async def chains(request: web.Request) -> web.Response:
    trail = request.app[TRAIL]
    return web.json_response({"chains": {name: chain.summary()
                                         for name, chain in sorted(trail.chains.items())}})


def make_app(settings: AppSettings, trail: AuditTrail | None = None) -> web.Application:
    app = base_app(NAME, settings)
    app[EVENTS] = EventLog()
    app[TRAIL] = trail if trail is not None else AuditTrail()
    app.router.add_post("/events", record_event)
    app.router.add_get("/events", list_events)
    app.router.add_post("/audit/records", take_records)
    app.router.add_get("/audit/chains", chains)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
