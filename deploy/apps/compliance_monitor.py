"""compliance-monitor: records compliance events that the other services report.

    POST /events   {"kind": "...", ...}  -> 202 {"event_id": N, ...}
    GET  /events                          -> 200 {"events": [...]}

Each stored event keeps the caller the sidecar verified (`x-source-service`),
so the trail shows who reported what. Events live in memory, newest 1000.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from deploy.apps.common import AppSettings, bad_request, base_app, json_object, reply, run, seen

NAME = "compliance-monitor"
KEPT_EVENTS = 1000


class EventLog:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.events: deque[dict[str, Any]] = deque(maxlen=KEPT_EVENTS)

    def add(self, event: dict[str, Any]) -> dict[str, Any]:
        stored = {"event_id": next(self._ids), **event}
        self.events.append(stored)
        return stored


EVENTS = web.AppKey("events", EventLog)


async def record_event(request: web.Request) -> web.Response:
    body = await json_object(request)
    kind = body.get("kind")
    if not isinstance(kind, str) or not kind:
        raise bad_request("an event needs a kind")
    caller = seen(request)
    stored = request.app[EVENTS].add(
        {
            **body,
            "reported_by": caller["source_service"],
            "trace_id": caller["trace_id"],
        }
    )
    return reply(request, {"accepted": True, "event_id": stored["event_id"]}, status=202)


async def list_events(request: web.Request) -> web.Response:
    return reply(request, {"events": list(request.app[EVENTS].events)})


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app[EVENTS] = EventLog()
    app.router.add_post("/events", record_event)
    app.router.add_get("/events", list_events)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
