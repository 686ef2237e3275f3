"""healthcare-api: runs a patient encounter as a saga in its sidecar.

    POST /encounters {"patient_id": "TEST-PATIENT-001", "amount_cents": 12500,
                      "encounter_id": "ENC-..." (optional)}

hands its sidecar (`POST /_sidecar/v1/sagas`, Idempotency-Key from the
encounter) three steps, each with its compensation:

    verify  insurance-verification  POST /verifications      undo: POST /verifications/{id}/void
    claim   billing-engine          POST /claims             undo: POST /claims/{id}/cancel
    notify  healthcare-api (here)   POST /encounters/{id}/notify

The sidecar runs them durably: a crash of the sidecar or of this app does
not lose the encounter, and a failed claim voids the verification. The
claim takes the copay from the verification's answer, and the notify step
brings this app what the others answered (templates). The answer:

    201  the encounter is done: coverage, claim, and the call tree
    202  the saga is still running (ask again with the same encounter_id)
    409  a service refused its step (4xx) and the encounter was rolled back
    422  no (active) coverage; nothing billed
    502  a step failed (5xx, unreachable) and the encounter was rolled back,
         or the sidecar could not take the encounter; `failed` names who

Posting the same `encounter_id` again finds the same saga, never a second one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from deploy.apps.common import (
    NEIGHBOURS,
    AppSettings,
    Reply,
    bad_request,
    base_app,
    idempotency_key,
    json_object,
    reply,
    run,
    trace_context,
)

NAME = "healthcare-api"
DEFAULT_AMOUNT_CENTS = 12_500
WAIT = "4s"  # within the edge's 5 s call timeout
STEP_SERVICES = {"verify": "insurance-verification", "claim": "billing-engine", "notify": NAME}
NO_COVERAGE = {"status_404": "no coverage on file", "status_422": "coverage is not active"}


def encounter_saga(encounter_id: str, patient_id: str, amount: int) -> dict[str, Any]:
    """The encounter as SPEC's saga definition."""
    verification = "{{steps.verify.response.verification}}"
    return {
        "name": "encounter",
        "steps": [
            {"name": "verify",
             "action": {"service": "insurance-verification", "method": "POST",
                        "path": "/verifications",
                        "body": {"patient_id": patient_id, "encounter_id": encounter_id}},
             "compensation": {"service": "insurance-verification", "method": "POST",
                              "path": "/verifications/"
                                      "{{steps.verify.response.verification.verification_id}}"
                                      "/void"}},
            {"name": "claim",
             "action": {"service": "billing-engine", "method": "POST", "path": "/claims",
                        "body": {"encounter_id": encounter_id, "patient_id": patient_id,
                                 "amount_cents": amount,
                                 "copay_cents": "{{steps.verify.response.verification"
                                                ".coverage.copay_cents}}"}},
             "compensation": {"service": "billing-engine", "method": "POST",
                              "path": "/claims/{{steps.claim.response.claim.claim_id}}/cancel"}},
            {"name": "notify",
             "action": {"service": NAME, "method": "POST",
                        "path": f"/encounters/{encounter_id}/notify",
                        "body": {"patient_id": patient_id, "verification": verification,
                                 "claim": "{{steps.claim.response.claim}}",
                                 "calls": [_node("verify"), _node("claim")]}}},
        ],
    }


def _node(step: str) -> dict[str, Any]:
    """What a step's app answered, as a node of the call tree (filled in by the sidecar)."""
    return {"service": STEP_SERVICES[step], "status": f"{{{{steps.{step}.response.status}}}}",
            "source_service": f"{{{{steps.{step}.response.source_service}}}}",
            "replayed": f"{{{{steps.{step}.response.replayed}}}}",
            "calls": f"{{{{steps.{step}.response.calls}}}}"}


ENCOUNTERS = web.AppKey("encounters", dict)  # encounter_id -> what the notify step brought


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
    started = await request.app[NEIGHBOURS].workflow(
        "POST", f"/sagas?wait={WAIT}", context=trace_context(request),
        json=encounter_saga(encounter_id, patient_id, amount),
        headers={"Idempotency-Key": f"encounter-{encounter_id}"},
    )
    return _answer(request, encounter_id, patient_id, started)


def _answer(request: web.Request, encounter_id: str, patient_id: str,
            started: Reply) -> web.Response:
    saga = started.body if isinstance(started.body, dict) else {}
    summary: dict[str, Any] = {"encounter_id": encounter_id, "patient_id": patient_id,
                               "saga": {k: saga.get(k) for k in ("id", "state", "steps")}}
    if started.status not in (200, 202) or "state" not in saga:
        sidecar = started.summary()
        return reply(request, {**summary, "error": "the sidecar did not take the encounter",
                               "failed": "sidecar", "calls": [sidecar]}, status=502)
    state = saga["state"]
    if state == "completed":
        done = request.app[ENCOUNTERS].get(encounter_id, {})
        return reply(request, {**summary, "coverage": done.get("verification", {}).get("coverage"),
                               "claim": done.get("claim"), "calls": done.get("calls", [])},
                     status=201)
    if state in ("running", "compensating"):
        return reply(request, {**summary, "error": "still in progress: post it again"},
                     status=202)
    failed = next((step for step in saga.get("steps", []) if step["status"] == "failed"), None)
    name = failed["name"] if failed else "?"
    if name == "verify" and failed and failed.get("last_reason") in NO_COVERAGE:
        return reply(request, {**summary, "error": NO_COVERAGE[failed["last_reason"]]},
                     status=422)
    rolled = "rolled back" if state == "compensated" else "NOT rolled back: a person must act"
    # A refusal (4xx) is the answer to this encounter; anything else, a failure upstream.
    refused = str((failed or {}).get("last_reason", "")).startswith("status_4")
    return reply(request, {**summary, "error": f"{name} did not complete; the encounter was "
                                               f"{rolled}",
                           "failed": STEP_SERVICES.get(name, name)},
                 status=409 if refused else 502)


async def notify(request: web.Request) -> web.Response:
    """The saga's last step: what the other steps answered, kept for the encounter's answer."""
    idempotency_key(request)
    body = await json_object(request)
    request.app[ENCOUNTERS][request.match_info["encounter_id"]] = body
    return reply(request, {"notified": True})


def _new_encounter_id() -> str:
    return f"ENC-{uuid.uuid4().hex[:12].upper()}"


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app[ENCOUNTERS] = {}
    app.router.add_post("/encounters", create_encounter)
    app.router.add_post("/encounters/{encounter_id}/notify", notify)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
