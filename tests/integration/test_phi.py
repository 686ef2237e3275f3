"""PHI canaries: identifiers sent through a real two-sidecar mesh surface in no telemetry.

SSN-, MRN- and date-of-birth-shaped values go in every part of a request the
app controls (path segments, query, header values, body), on calls that
succeed, fail upstream, are retried, denied, refused as malformed or routed
nowhere. None of them may then appear in the spans as the collector received
them (every byte of every export), in `/metrics`, in either sidecar's stdout
or stderr, in either audit file, or in `/admin/services` and `/admin/config`.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from deploy.process import SidecarProcess
from tests.support.audit import audit_lines
from tests.support.otlp import OtlpReceiver

pytestmark = pytest.mark.timeout(60)

SSN = "078-05-1120"
MRN = "MRN12345678"
DOB = "1957-03-14"
CANARIES = (SSN, MRN, DOB)
# The same values as they might be re-spelt on the way: lower-cased (a Host
# header), or with their separators dropped. (None of them has a character
# that percent- or JSON-escaping would change.)
SPELLINGS = tuple(
    {
        spelling
        for canary in CANARIES
        for spelling in (canary, canary.lower(), canary.replace("-", ""))
    }
)

POLICY = [{"from": ["a"], "methods": ["GET", "POST"], "paths": ["/claims", "/claims/*"]}]
QUERY = f"ssn={SSN}&mrn={MRN}&dob={DOB}"
HEADERS = {
    "x-patient-ssn": SSN,
    "x-patient-mrn": MRN,
    "x-patient-dob": DOB,
    "Authorization": f"Bearer {MRN}",
    "Cookie": f"dob={DOB}; ssn={SSN}",
    "User-Agent": f"intake/{MRN}",
    "baggage": f"patient.mrn={MRN},patient.dob={DOB}",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": f"intake={MRN},dob={DOB}",
    "x-sidecar-timeout-ms": SSN,  # not a number: the sidecar must ignore it quietly
    "Idempotency-Key": MRN,
}
BODY = json.dumps({"ssn": SSN, "mrn": MRN, "dob": DOB}).encode()


class RawReceiver(OtlpReceiver):
    """An OTLP receiver that also keeps each export's bytes, so every field can be searched."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[bytes] = []

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # aiohttp keeps the body, so the parent reads it again
        self.exports.append(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        return await super()._receive(request)


def leaks(text: str) -> list[str]:
    return [spelling for spelling in SPELLINGS if spelling in text]


async def echo_and_fail(request: web.Request) -> web.StreamResponse:
    """B's app: answers with the canaries in its headers and body; fails on /claims/fail."""
    body = await request.read()
    status = 503 if request.path.startswith("/claims/fail") else 200
    return web.json_response(
        {"path": request.path, "query": request.query_string, "body": body.decode()},
        status=status,
        headers={"x-patient-mrn": MRN, "x-patient-dob": DOB},
    )


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, str]:
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        return response.status, response.headers.get("x-sidecar-reason", "")


async def test_no_canary_reaches_spans_metrics_logs_audit_or_admin(make_mesh, upstreams):
    async with RawReceiver() as receiver:
        mesh = make_mesh(["a", "b"])
        app_b = await upstreams(script=echo_and_fail).start()
        tracing = {"exporter": "otlp", "endpoint": receiver.url}
        fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
        b = mesh.sidecar(
            "b", drain_timeout="1s", tracing=tracing, inbound={"app": app_b.url, "policy": POLICY}
        )
        b.env.update(fast_export)
        await b.start()
        retry = {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}}
        a = mesh.sidecar(
            "a",
            drain_timeout="1s",
            tracing=tracing,
            services={"b": {"endpoints": [b.inbound_url], "retry": retry}},
        )
        a.env.update(fast_export)
        await a.start()

        out = a.outbound_url
        path = f"/b/claims/{MRN}/{SSN}/{DOB}"
        async with aiohttp.ClientSession() as session:
            outcomes = [
                # Allowed, with canaries everywhere the app controls.
                await call(session, "GET", f"{out}{path}?{QUERY}", headers=HEADERS),
                await call(session, "POST", f"{out}{path}?{QUERY}", headers=HEADERS, data=BODY),
                # The app fails: a 503 with canaries, retried once (GET).
                await call(session, "GET", f"{out}/b/claims/fail/{MRN}?{QUERY}", headers=HEADERS),
                # Denied by b's policy: method, then path.
                await call(session, "DELETE", f"{out}{path}?{QUERY}", headers=HEADERS, data=BODY),
                await call(
                    session, "GET", f"{out}/b/patients/{SSN}/{DOB}?{QUERY}", headers=HEADERS
                ),
                # Routed nowhere: by path, by Host, by absolute form.
                await call(session, "GET", f"{out}/{MRN}/claims/{SSN}?{QUERY}", headers=HEADERS),
                await call(
                    session, "GET", f"{out}/claims/{SSN}", headers={"Host": f"{MRN}.example"}
                ),
                await call(session, "GET", f"http://{MRN.lower()}/claims/{DOB}?{QUERY}", proxy=out),
                # A malformed path, refused by b before its policy.
                await call(
                    session, "GET", f"{out}/b/claims/{MRN}%2F{SSN}?{QUERY}", headers=HEADERS
                ),
                # Straight at b's inbound port: no token, then a token that is a canary.
                await call(
                    session, "GET", f"{b.inbound_url}/claims/{MRN}?{QUERY}", headers=HEADERS
                ),
                await call(
                    session,
                    "GET",
                    f"{b.inbound_url}/claims/{MRN}?{QUERY}",
                    headers={**HEADERS, "x-service-token": f"{MRN}.{SSN}.{DOB}"},
                ),
                # A header line over the limit, made of canaries.
                await call(session, "GET", f"{out}{path}", headers={"x-notes": MRN * 1000}),
            ]
            admin = {
                name: await admin_views(session, process) for name, process in (("a", a), ("b", b))
            }
        assert outcomes == [
            (200, ""),
            (200, ""),
            (503, ""),
            (403, "policy_denied"),
            (403, "policy_denied"),
            (404, "no_route"),
            (404, "no_route"),
            (404, "no_route"),
            (400, "bad_request"),
            (401, "token_missing"),
            (401, "token_invalid"),
            (431, "headers_too_large"),
        ]
        await a.stop()
        await b.stop()
        spans = receiver.spans
        exports = receiver.exports

    # The canaries did travel: the app saw them in path, query, headers and body.
    seen = app_b.seen
    assert [s.path for s in seen] == [
        f"/claims/{MRN}/{SSN}/{DOB}",
        f"/claims/{MRN}/{SSN}/{DOB}",
        f"/claims/fail/{MRN}",
        f"/claims/fail/{MRN}",
    ]
    assert all(s.query == QUERY and s.headers["x-patient-ssn"] == SSN for s in seen)
    assert seen[1].body == BODY
    # And telemetry did record the calls, so finding nothing below means something.
    assert {s["service_name"] for s in spans} == {"a", "b"}
    assert len(spans) >= 10
    assert any(s["name"] == "GET /claims/{id}/{id}/{id}" for s in spans)
    # a also audits the 431 it refused while parsing the headers.
    assert len(audit_lines(a)) == 10 and len(audit_lines(b)) == 9

    found: dict[str, list[str]] = {}
    for i, export in enumerate(exports):
        message = ExportTraceServiceRequest()
        message.ParseFromString(export)
        # Raw bytes catch any field (trace_state, events, links, resource); the
        # decoded text catches what protobuf escapes.
        found[f"export {i}"] = leaks(export.decode("latin-1")) + leaks(str(message))
    for process in (a, b):
        found[f"{process.name} stdout"] = leaks(process.stdout_path.read_text())
        found[f"{process.name} stderr"] = leaks(process.stderr_path.read_text())
        found[f"{process.name} audit"] = leaks(process.audit_path.read_text())
    for name, views in admin.items():
        for view, text in views.items():
            found[f"{name} {view}"] = leaks(text)
    assert {where: hits for where, hits in found.items() if hits} == {}


async def admin_views(session: aiohttp.ClientSession, process: SidecarProcess) -> dict[str, str]:
    views = {}
    for view in ("/metrics", "/admin/services", "/admin/config"):
        async with session.get(process.admin_url + view) as response:
            assert response.status == 200, view
            views[view] = await response.text()
    return views
