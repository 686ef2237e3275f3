"""billing-engine: files claims for encounters, once per Idempotency-Key.

    POST /claims  (Idempotency-Key required) -> 201 {"claim": {...}}; the same key again
                                                -> 200 with the same claim, "replayed": true
    POST /claims/{claim_id}/cancel  (Idempotency-Key required) -> 200 | 404
    GET  /claims/{claim_id}                   -> 200 {"claim": {...}} | 404

Filing a claim is a step of an encounter's saga, and cancelling it that
step's compensation. The key makes a step sent again (a retry, or a resend
after the sidecar crashed) safe: it is filed or cancelled once. Each is
reported to compliance-monitor through the sidecar's fan-out, which delivers
it even while compliance-monitor is down.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeGuard

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

NAME = "billing-engine"
MAX_AMOUNT_CENTS = 10_000_000


class Claims:
    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.by_key: dict[str, dict[str, Any]] = {}
        self.by_id: dict[str, dict[str, Any]] = {}
        self.cancelled_by: dict[str, dict[str, Any]] = {}  # cancel key -> the claim
        self.reports: dict[str, list[dict[str, Any]]] = {}  # key -> the first answer's calls

    def add(self, key: str, fields: dict[str, Any]) -> dict[str, Any]:
        claim = {"claim_id": f"CLM-{next(self._numbers):06d}", "status": "submitted", **fields}
        self.by_key[key] = claim
        self.by_id[claim["claim_id"]] = claim
        return claim


CLAIMS = web.AppKey("claims", Claims)


def _is_cents(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def claim_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The claim a request asks for, split into what the payer and the patient owe."""
    amount = body.get("amount_cents")
    if not _is_cents(amount) or not 0 < amount <= MAX_AMOUNT_CENTS:
        raise bad_request("amount_cents must be a positive whole number of cents")
    for name in ("encounter_id", "patient_id"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise bad_request(f"{name} is required")
    copay = body.get("copay_cents", 0)
    patient_owes = min(copay, amount) if _is_cents(copay) and copay > 0 else 0
    return {
        "encounter_id": body["encounter_id"],
        "patient_id": body["patient_id"],
        "amount_cents": amount,
        "patient_owes_cents": patient_owes,
        "payer_owes_cents": amount - patient_owes,
    }


async def submit_claim(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    claims = request.app[CLAIMS]
    if key in claims.by_key:
        # The first answer again, so a step sent twice reads the same either time.
        return reply(request, {"claim": claims.by_key[key], "replayed": True,
                               "calls": claims.reports.get(key, [])})
    # Stored before the report goes out, so a retry arriving meanwhile is a replay.
    claim = claims.add(key, claim_fields(await json_object(request)))
    node = await report(
        request,
        {"kind": "claim-submitted", "claim_id": claim["claim_id"],
         "encounter_id": claim["encounter_id"]},
        key=f"{claim['claim_id']}:submitted",
    )
    claims.reports[key] = [node]
    return reply(request, {"claim": claim, "replayed": False, "calls": [node]}, status=201)


async def cancel_claim(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    claims = request.app[CLAIMS]
    if key in claims.cancelled_by:
        return reply(request, {"claim": claims.cancelled_by[key], "replayed": True})
    claim = claims.by_id.get(request.match_info["claim_id"])
    if claim is None:
        return reply(request, {"error": "no such claim"}, status=404)
    claim["status"] = "cancelled"
    claims.cancelled_by[key] = claim
    node = await report(request, {"kind": "claim-cancelled", "claim_id": claim["claim_id"],
                                  "encounter_id": claim["encounter_id"]},
                        key=f"{claim['claim_id']}:cancelled")
    return reply(request, {"claim": claim, "replayed": False, "calls": [node]})


async def get_claim(request: web.Request) -> web.Response:
    claim = request.app[CLAIMS].by_id.get(request.match_info["claim_id"])
    if claim is None:
        return reply(request, {"error": "no such claim"}, status=404)
    return reply(request, {"claim": claim})


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app[CLAIMS] = Claims()
    app.router.add_post("/claims", submit_claim)
    app.router.add_post("/claims/{claim_id}/cancel", cancel_claim)
    app.router.add_get("/claims/{claim_id}", get_claim)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
