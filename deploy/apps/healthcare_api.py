"""healthcare-api: orchestrates a patient encounter.

    POST /encounters {"patient_id": "TEST-PATIENT-001", "amount_cents": 12500}

checks coverage with insurance-verification (`GET /patients/{id}/coverage`),
then files a claim with billing-engine (`POST /claims`, with an
Idempotency-Key derived from the encounter, so a retry files it once). Both
report to compliance-monitor. The answer is a summary with the call tree:
who was called, what they answered and which caller each of them saw.

    201  encounter done
    422  no active coverage for the patient
    502  a dependency failed; `failed` names it, `calls` shows how
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from aiohttp import web

from deploy.apps.common import (
    NEIGHBOURS,
    AppSettings,
    Reply,
    bad_request,
    base_app,
    json_object,
    reply,
    run,
    trace_context,
)

NAME = "healthcare-api"
DEFAULT_AMOUNT_CENTS = 12_500


def _answer(
    request: web.Request, status: int, encounter_id: str, calls: list[Reply], **fields: Any
) -> web.Response:
    summary = {"encounter_id": encounter_id, **fields, "calls": [c.summary() for c in calls]}
    return reply(request, summary, status=status)


def _failed(request: web.Request, encounter_id: str, calls: list[Reply]) -> web.Response:
    failed = calls[-1].service
    return _answer(
        request, 502, encounter_id, calls, error=f"{failed} did not complete", failed=failed
    )


async def create_encounter(request: web.Request) -> web.Response:
    body = await json_object(request)
    patient_id = body.get("patient_id")
    if not isinstance(patient_id, str) or not patient_id:
        raise bad_request("patient_id is required")
    amount = body.get("amount_cents", DEFAULT_AMOUNT_CENTS)
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise bad_request("amount_cents must be a positive whole number of cents")
    given = body.get("encounter_id")
    encounter_id = given if isinstance(given, str) and given else _new_encounter_id()
    neighbours = request.app[NEIGHBOURS]
    context = trace_context(request)

    coverage = await neighbours.call(
        "insurance-verification",
        "GET",
        f"/patients/{quote(patient_id, safe='')}/coverage",
        context=context,
    )
    calls = [coverage]
    plan = coverage.field("coverage")
    if coverage.status == 404 and coverage.reason is None:
        # The app said "no such patient"; a 404 the mesh made (no_route) is a failure.
        return _answer(request, 422, encounter_id, calls, error="no coverage on file")
    if not coverage.ok or not isinstance(plan, dict):
        return _failed(request, encounter_id, calls)
    if not plan.get("active"):
        return _answer(request, 422, encounter_id, calls, error="coverage is not active")

    claim = await neighbours.call(
        "billing-engine",
        "POST",
        "/claims",
        context=context,
        # Derived from the encounter, so a retried POST files the claim once.
        headers={"Idempotency-Key": f"claim-{encounter_id}"},
        json={
            "encounter_id": encounter_id,
            "patient_id": patient_id,
            "amount_cents": amount,
            "copay_cents": plan.get("copay_cents", 0),
        },
    )
    calls.append(claim)
    if not claim.ok:
        return _failed(request, encounter_id, calls)
    return _answer(
        request,
        201,
        encounter_id,
        calls,
        patient_id=patient_id,
        coverage=plan,
        claim=claim.field("claim"),
    )


def _new_encounter_id() -> str:
    return f"ENC-{uuid.uuid4().hex[:12].upper()}"


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app.router.add_post("/encounters", create_encounter)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
