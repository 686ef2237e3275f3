"""billing-engine: files claims for encounters, once per Idempotency-Key.

    POST /claims  (Idempotency-Key required) -> 201 {"claim": {...}}; the same key again
                                                -> 200 with the same claim, "replayed": true
    GET  /claims/{claim_id}                   -> 200 {"claim": {...}} | 404

The key makes a retried POST safe, which is also what lets the sidecar retry
it. A new claim is reported to compliance-monitor, best effort.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeGuard

from aiohttp import web

from deploy.apps.common import (
    NEIGHBOURS,
    AppSettings,
    bad_request,
    base_app,
    json_object,
    reply,
    run,
    trace_context,
)

NAME = "billing-engine"
MAX_AMOUNT_CENTS = 10_000_000


class Claims:
    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.by_key: dict[str, dict[str, Any]] = {}
        self.by_id: dict[str, dict[str, Any]] = {}

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
    key = request.headers.get("Idempotency-Key")
    if not key:
        raise bad_request("an Idempotency-Key header is required")
    claims = request.app[CLAIMS]
    if key in claims.by_key:
        return reply(request, {"claim": claims.by_key[key], "replayed": True})
    # Stored before the report goes out, so a retry arriving meanwhile is a replay.
    claim = claims.add(key, claim_fields(await json_object(request)))
    report = await request.app[NEIGHBOURS].call(
        "compliance-monitor",
        "POST",
        "/events",
        context=trace_context(request),
        json={
            "kind": "claim-submitted",
            "claim_id": claim["claim_id"],
            "encounter_id": claim["encounter_id"],
        },
    )
    return reply(
        request, {"claim": claim, "replayed": False, "calls": [report.summary()]}, status=201
    )


async def get_claim(request: web.Request) -> web.Response:
    claim = request.app[CLAIMS].by_id.get(request.match_info["claim_id"])
    if claim is None:
        return reply(request, {"error": "no such claim"}, status=404)
    return reply(request, {"claim": claim})


def make_app(settings: AppSettings) -> web.Application:
    app = base_app(NAME, settings)
    app[CLAIMS] = Claims()
    app.router.add_post("/claims", submit_claim)
    app.router.add_get("/claims/{claim_id}", get_claim)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    run(NAME, make_app, argv)


if __name__ == "__main__":
    main()
