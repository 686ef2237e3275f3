"""A real aiohttp app that applies each effect once per Idempotency-Key, and counts.

It is what a workflow's step target should be: `POST /things` makes a thing
(201 {"id": ...}), `POST /things/{id}/undo` undoes it; the same key again
gets the first answer back and changes nothing. The ledger counts every
request by key (`received`) and every effect (`applied`, in order), so a
test can tell "sent twice" from "applied twice".

Scripts: `fail(path_prefix, status, times)` answers `status` instead,
`times` times (None: until `heal`); `hold(path_prefix)` keeps the answer
until the test calls `release` (the effect is applied first), for a kill at
an exact moment without sleeps. Ledgers given one `journal` list record
every effect there in the order it happened, across apps.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.upstream import serve


@dataclass
class Failure:
    status: int
    times: int | None
    each_key: bool = False  # `times` counts per Idempotency-Key
    seen: Counter[str] = field(default_factory=Counter)


@dataclass
class Ledger:
    name: str
    port: int = 0
    received: Counter[str] = field(default_factory=Counter)
    applied: list[tuple[str, str]] = field(default_factory=list)  # (effect, key), in order
    sources: list[str | None] = field(default_factory=list)  # x-source-service seen
    traceparents: list[str] = field(default_factory=list)
    journal: list[tuple[str, str, str]] = field(default_factory=list)  # (app, effect, key)
    _answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _failures: dict[str, Failure] = field(default_factory=dict)
    _holds: dict[str, asyncio.Event] = field(default_factory=dict)
    held: asyncio.Event = field(default_factory=asyncio.Event)  # set when a held call arrives
    in_flight: Counter[str] = field(default_factory=Counter)
    most_at_once: Counter[str] = field(default_factory=Counter)  # per key, ever
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None

    # ---- scripts

    def fail(self, prefix: str, status: int, times: int | None = None, *,
             each_key: bool = False) -> None:
        self._failures[prefix] = Failure(status, times, each_key)

    def heal(self) -> None:
        self._failures.clear()

    def hold(self, prefix: str) -> None:
        self._holds[prefix] = asyncio.Event()

    def release(self) -> None:
        for gate in self._holds.values():
            gate.set()
        self._holds.clear()

    def effects(self, kind: str) -> list[str]:
        return [key for effect, key in self.applied if effect == kind]

    # ---- the app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key", "")
        self.in_flight[key] += 1
        self.most_at_once[key] = max(self.most_at_once[key], self.in_flight[key])
        try:
            return await self._answer(request, key)
        finally:
            self.in_flight[key] -= 1

    async def _answer(self, request: web.Request, key: str) -> web.StreamResponse:
        await request.read()
        self.received[key] += 1
        self.sources.append(request.headers.get("x-source-service"))
        self.traceparents.append(request.headers.get("traceparent", ""))
        for prefix, failure in list(self._failures.items()):
            if not request.path.startswith(prefix):
                continue
            if failure.each_key:
                failure.seen[key] += 1
                if failure.times is None or failure.seen[key] <= failure.times:
                    return web.json_response({"error": "scripted"}, status=failure.status)
            elif failure.times != 0:
                if failure.times is not None:
                    failure.times -= 1
                return web.json_response({"error": "scripted"}, status=failure.status)
        if key not in self._answers:
            if request.method == "POST" and request.path.endswith("/undo"):
                self.applied.append(("undo", key))
                self.journal.append((self.name, "undo", key))
                self._answers[key] = (200, {"undone": request.match_info["id"]})
            else:
                thing = f"{self.name.upper()}-{next(self._ids)}"
                self.applied.append(("make", key))
                self.journal.append((self.name, "make", key))
                self._answers[key] = (201, {"id": thing, "thing": {"id": thing, "n": 7}})
        for prefix, gate in list(self._holds.items()):
            if request.path.startswith(prefix):
                self.held.set()
                await gate.wait()
        status, body = self._answers[key]
        return web.json_response(body, status=status)

    async def start(self) -> Ledger:
        app = web.Application()
        app.router.add_post("/things", self._handle)
        app.router.add_post("/things/{id}/undo", self._handle)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve(app, self.port)
        return self

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
