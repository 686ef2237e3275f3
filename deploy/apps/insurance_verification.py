"""insurance-verification: checks a (fake) patient's coverage, and keeps the checks made.

    GET  /patients/{patient_id}/coverage     -> 200 {"coverage": {...}} | 404
    POST /verifications {"patient_id", "encounter_id"}   (Idempotency-Key required)
                                             -> 201 {"verification": {...}} | 404 none | 422 lapsed
    POST /verifications/{id}/void            (Idempotency-Key required) -> 200 | 404
    GET  /verifications/{id}                 -> 200 {"verification": {...}} | 404

A verification is the first step of an encounter's saga, and voiding it is
that step's compensation. Both take effect once per Idempotency-Key: the
same key again answers as the first time did and changes nothing, so the
sidecar may send a step again after a failure or a crash. Each check is
reported to compliance-monitor through the sidecar's fan-out: stored before
the answer, delivered however long compliance-monitor is down.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from deploy.apps.common import (
    AppSettings,
    bad_request,
    base_app,
    idempotency_key,
    json_object,
    reply,
    report,
    run,
)

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


class Verifications:
    """The checks made, and each key's first answer (status, body)."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.by_id: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}

    def add(self, patient_id: str, encounter_id: str, coverage: dict[str, Any]) -> dict[str, Any]:
        verification = {"verification_id": f"VER-{next(self._numbers):06d}",
                        "patient_id": patient_id, "encounter_id": encounter_id,
                        "coverage": coverage, "status": "valid"}
        self.by_id[verification["verification_id"]] = verification
        return verification


VERIFICATIONS = web.AppKey("verifications", Verifications)


async def coverage(request: web.Request) -> web.Response:
    patient_id = request.match_info["patient_id"]
    found = COVERAGE.get(patient_id)
    if found is None:
        return reply(request, {"error": "no coverage on file", "patient_id": patient_id},
                     status=404)
    return reply(request, {"patient_id": patient_id, "coverage": found})


def _replay(request: web.Request, key: str) -> web.Response | None:
    """The first answer given for `key` again, if there was one."""
    answer = request.app[VERIFICATIONS].answers.get(key)
    if answer is None:
        return None
    status, body = answer
    return reply(request, {**body, "replayed": True}, status=status)


async def verify(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    checks = request.app[VERIFICATIONS]
    if (again := _replay(request, key)) is not None:
        return again
    body = await json_object(request)
    patient_id, encounter_id = body.get("patient_id"), body.get("encounter_id")
    if not isinstance(patient_id, str) or not isinstance(encounter_id, str):
        raise bad_request("patient_id and encounter_id are required")
    found = COVERAGE.get(patient_id)
    if found is None:
        answer: tuple[int, dict[str, Any]] = (404, {"error": "no coverage on file"})
    elif not found["active"]:
        answer = (422, {"error": "coverage is not active"})
    else:
        verification = checks.add(patient_id, encounter_id, found)
        node = await report(request, {"kind": "coverage-verified", "patient_id": patient_id,
                                      "encounter_id": encounter_id,
                                      "verification_id": verification["verification_id"]},
                            key=f"{verification['verification_id']}:verified")
        answer = (201, {"verification": verification, "calls": [node]})
    checks.answers[key] = answer
    return reply(request, {**answer[1], "replayed": False}, status=answer[0])


async def void(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    checks = request.app[VERIFICATIONS]
    if (again := _replay(request, key)) is not None:
        return again
    verification = checks.by_id.get(request.match_info["verification_id"])
    if verification is None:
        return reply(request, {"error": "no such verification"}, status=404)
    verification["status"] = "void"
    node = await report(request, {"kind": "verification-voided",
                                  "verification_id": verification["verification_id"]},
                        key=f"{verification['verification_id']}:voided")
    checks.answers[key] = (200, {"verification": verification, "calls": [node]})
    return reply(request, {**checks.answers[key][1], "replayed": False})


async def get_verification(request: web.Request) -> web.Response:
    verification = request.app[VERIFICATIONS].by_id.get(request.match_info["verification_id"])
    if verification is None:
        return reply(request, {"error": "no such verification"}, status=404)
    return reply(request, {"verification": verification})


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app[VERIFICATIONS] = Verifications()
    app.router.add_get("/patients/{patient_id}/coverage", coverage)
    app.router.add_post("/verifications", verify)
    app.router.add_post("/verifications/{verification_id}/void", void)
    app.router.add_get("/verifications/{verification_id}", get_verification)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
