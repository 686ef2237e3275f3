"""The example mesh's shape: which module serves each service, and who may call whom.

The deployment tests check the compose files, the Kubernetes manifests and the
sidecar configs against this; the demo and the topology test start the apps
from it. `edge` is the identity outside callers use: a sidecar with no server
behind it, beside the client (`deploy.apps.client`).
"""

from __future__ import annotations

from dataclasses import dataclass

EDGE = "edge"
CLIENT_MODULE = "deploy.apps.client"

# service -> module serving it on APP_HOST:APP_PORT (127.0.0.1:8000 by default)
APPS: dict[str, str] = {
    "healthcare-api": "deploy.apps.healthcare_api",
    "insurance-verification": "deploy.apps.insurance_verification",
    "billing-engine": "deploy.apps.billing_engine",
    "compliance-monitor": "deploy.apps.compliance_monitor",
}

# Every mesh identity: each has a sidecar, a key pair and a config in deploy/config.
SERVICES: tuple[str, ...] = (EDGE, *APPS)


@dataclass(frozen=True, slots=True)
class Call:
    source: str
    target: str
    method: str
    path: str


# Every call the example apps and their sidecars make (saga steps, fan-out
# deliveries, audit shipping), each one admitted by its target's policy.
ALLOWED: tuple[Call, ...] = (
    Call(EDGE, "healthcare-api", "POST", "/encounters"),
    Call("healthcare-api", "insurance-verification", "GET", "/patients/TEST-PATIENT-001/coverage"),
    Call("healthcare-api", "insurance-verification", "POST", "/verifications"),
    Call("healthcare-api", "insurance-verification", "POST", "/verifications/VER-000001/void"),
    Call("healthcare-api", "billing-engine", "POST", "/claims"),
    Call("healthcare-api", "billing-engine", "POST", "/claims/CLM-000001/cancel"),
    Call("healthcare-api", "billing-engine", "GET", "/claims/CLM-000001"),
    Call("healthcare-api", "healthcare-api", "POST", "/encounters/ENC-1/notify"),
    Call("insurance-verification", "compliance-monitor", "POST", "/events"),
    Call("billing-engine", "compliance-monitor", "POST", "/events"),
    Call(EDGE, "compliance-monitor", "GET", "/events"),
    Call(EDGE, "compliance-monitor", "GET", "/audit/chains"),
    *(Call(source, "compliance-monitor", "POST", "/audit/records")
      for source in (EDGE, *APPS)),
)

# Calls the target's policy refuses (403 policy_denied). Only the edge's reach a
# target: the others are not in their caller's `services`, so they end at no_route.
DENIED: tuple[Call, ...] = (
    Call(EDGE, "billing-engine", "POST", "/claims"),
    Call(EDGE, "insurance-verification", "GET", "/patients/TEST-PATIENT-001/coverage"),
    Call(EDGE, "compliance-monitor", "POST", "/events"),
    Call(EDGE, "healthcare-api", "GET", "/encounters"),
    Call(EDGE, "healthcare-api", "POST", "/encounters/ENC-1/notify"),
    Call(EDGE, "compliance-monitor", "POST", "/audit/chains"),
    Call("healthcare-api", "compliance-monitor", "POST", "/events"),
    Call("insurance-verification", "billing-engine", "POST", "/claims"),
    Call("billing-engine", "insurance-verification", "GET", "/patients/TEST-PATIENT-001/coverage"),
    Call("compliance-monitor", "healthcare-api", "POST", "/encounters"),
)


def callees(source: str) -> set[str]:
    """The services `source` (or its sidecar) calls."""
    return {call.target for call in ALLOWED if call.source == source}
