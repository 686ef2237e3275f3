"""insurance-verification: answers whether a (fake) patient has active coverage.

    GET /patients/{patient_id}/coverage -> 200 {"coverage": {...}} | 404

Every check is reported to compliance-monitor (`POST /events`). Reporting is
best effort: the answer says how the report went but does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from deploy.apps.common import NEIGHBOURS, AppSettings, base_app, reply, run, trace_context

NAME = "insurance-verification"

# Obviously synthetic records: no real person, plan or member number.
COVERAGE: dict[str, dict[str, Any]] = {
    "TEST-PATIENT-001": {
        "plan": "Synthetic Gold PPO (fake)",
        "member_id": "FAKE-MBR-0001",
        "active": True,
        "copay_cents": 2500,
    },
    "TEST-PATIENT-002": {
        "plan": "Synthetic Silver HMO (fake)",
        "member_id": "FAKE-MBR-0002",
        "active": True,
        "copay_cents": 4000,
    },
    "TEST-PATIENT-003": {
        "plan": "Synthetic Bronze (fake, lapsed)",
        "member_id": "FAKE-MBR-0003",
        "active": False,
        "copay_cents": 0,
    },
}


async def coverage(request: web.Request) -> web.Response:
    patient_id = request.match_info["patient_id"]
    found = COVERAGE.get(patient_id)
    report = await request.app[NEIGHBOURS].call(
        "compliance-monitor",
        "POST",
        "/events",
        context=trace_context(request),
        json={"kind": "coverage-checked", "patient_id": patient_id, "found": found is not None},
    )
    calls = [report.summary()]
    if found is None:
        return reply(
            request,
            {"error": "no coverage on file", "patient_id": patient_id, "calls": calls},
            status=404,
        )
    return reply(request, {"patient_id": patient_id, "coverage": found, "calls": calls})


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app.router.add_get("/patients/{patient_id}/coverage", coverage)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
