"""The example services, run in-process on 127.0.0.1 with fake sidecars.

A `FakeSidecar` stands in for one app's outbound sidecar: it records what the
app sent and answers from a script, or passes the call to the real target app
the way the mesh would (with `x-source-service` set to the caller). Wiring one
per service gives the whole encounter workflow without a real sidecar.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from deploy.apps import (
    billing_engine,
    client,
    compliance_monitor,
    healthcare_api,
    insurance_verification,
)
from deploy.apps.common import AppSettings, Neighbours, settings_from
from deploy.process import free_port, free_ports
from deploy.topology import APPS, EDGE, SERVICES
from sidecar.audit.log import AuditLog
from sidecar.workflows import templating
from sidecar.workflows.model import Request
from tests.deploy import REPO

MODULES = {
    "healthcare-api": healthcare_api,
    "insurance-verification": insurance_verification,
    "billing-engine": billing_engine,
    "compliance-monitor": compliance_monitor,
}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
FORWARDED = ("traceparent", "tracestate", "idempotency-key", "content-type")

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


@dataclass
class Seen:
    service: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def problem(status: int, reason: str) -> web.Response:
    """An answer as a sidecar makes it: problem+json, with the reason in a header too."""
    return web.json_response(
        {"type": "about:blank", "title": reason, "status": status, "reason": reason},
        status=status,
        content_type="application/problem+json",
        headers={"x-sidecar-reason": reason},
    )


@dataclass
class FakeSidecar:
    """One app's outbound sidecar, minus the sidecar: records, then scripts or forwards.

    Its own API is faked too: `POST /_sidecar/v1/fanout` delivers the event to
    compliance-monitor at once, and `POST /_sidecar/v1/sagas` runs the saga's
    steps one after the other, with their keys and templates, compensating in
    reverse when one fails, as the real engine would (minus its durability).
    """

    name: str
    seen: list[Seen] = field(default_factory=list)
    script: dict[str, Callable[[Seen], web.Response]] = field(default_factory=dict)
    apps: dict[str, str] = field(default_factory=dict)  # service -> its app's base URL
    url: str = ""
    session: aiohttp.ClientSession | None = None
    sagas: dict[str, dict[str, Any]] = field(default_factory=dict)  # Idempotency-Key -> view
    fanouts: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{service}/{rest:.*}", self.handle)

        async def client(app: web.Application) -> AsyncIterator[None]:
            async with aiohttp.ClientSession() as session:
                self.session = session
                yield

        app.cleanup_ctx.append(client)
        return app

    def calls_to(self, service: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.service == service]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        seen = Seen(
            service=request.match_info["service"],
            method=request.method,
            path="/" + request.match_info["rest"],
            headers={k.lower(): v for k, v in request.headers.items()},
            body=json.loads(raw) if raw else None,
        )
        self.seen.append(seen)
        if seen.service in self.script:
            return self.script[seen.service](seen)
        if seen.service == "_sidecar":
            return await self.api(seen)
        if seen.service not in self.apps:
            return problem(404, "no_route")
        headers = {k: v for k, v in seen.headers.items() if k in FORWARDED}
        status, body = await self.forward(seen.service, seen.method, seen.path, seen.body,
                                          headers)
        return web.json_response(body, status=status)

    async def send(self, service: str, method: str, path: str, body: Any,
                   headers: dict[str, str]) -> tuple[int, Any]:
        """A call the (fake) sidecar makes itself: a saga step or a delivery; seen too."""
        self.seen.append(Seen(service, method, path, headers, body))
        return await self.forward(service, method, path, body, headers)

    async def forward(self, service: str, method: str, path: str, body: Any,
                      headers: dict[str, str]) -> tuple[int, Any]:
        # What the target's sidecar would vouch for.
        headers = {**headers, "x-source-service": self.name}
        assert self.session is not None
        async with self.session.request(method, self.apps[service] + path, json=body,
                                        headers=headers) as answer:
            return answer.status, await answer.json(content_type=None)

    async def api(self, seen: Seen) -> web.Response:
        key = seen.headers.get("idempotency-key", "")
        context = {k: v for k, v in seen.headers.items() if k == "traceparent"}
        if seen.path == "/v1/fanout":
            self.fanouts.append(seen.body)
            fanout = f"F-{self.name}-{len(self.fanouts)}"
            for target in seen.body["targets"]:
                if target in self.apps:
                    await self.send(target, seen.body["method"], seen.body["path"],
                                       seen.body["body"],
                                       {**context, "idempotency-key": f"{fanout}:{target}"})
            return web.json_response({"id": fanout}, status=202)
        if seen.path.startswith("/v1/sagas"):
            if key not in self.sagas:
                self.sagas[key] = await self.run_saga(f"S-{len(self.sagas) + 1}", seen.body,
                                                      context)
            return web.json_response(self.sagas[key])
        return problem(404, "not_found")

    async def run_saga(self, id: str, doc: dict[str, Any],
                       context: dict[str, str]) -> dict[str, Any]:
        steps = doc["steps"]
        states = [{"name": s["name"], "status": "pending", "attempts": 0, "last_reason": None}
                  for s in steps]
        values: dict[str, dict[str, Any]] = {}
        state = "completed"
        for step, st in zip(steps, states, strict=True):
            request = templating.render(Request.from_json(step["action"]), values)
            st["attempts"] = 1
            status, body = await self.send(
                request.service, request.method, request.path, request.body,
                {**context, "idempotency-key": f"{id}:{step['name']}:action"})
            if not 200 <= status < 300:
                st["status"], st["last_reason"] = "failed", f"status_{status}"
                state = "compensated"
                break
            st["status"] = "done"
            values[step["name"]] = templating.extract(body, _fields(steps, step["name"]))
        if state == "compensated":
            for step, st in reversed(list(zip(steps, states, strict=True))):
                if st["status"] == "done" and step.get("compensation"):
                    request = templating.render(Request.from_json(step["compensation"]), values)
                    await self.send(
                        request.service, request.method, request.path, request.body,
                        {**context, "idempotency-key": f"{id}:{step['name']}:compensation"})
                    st["status"] = "compensated"
        return {"id": id, "name": doc["name"], "state": state, "steps": states}


def _fields(steps: list[dict[str, Any]], name: str) -> list[str]:
    refs = [ref for s in steps for part in ("action", "compensation") if s.get(part)
            for ref in templating.references(Request.from_json(s[part]))]
    return [path for step, path in refs if step == name]


@dataclass
class Mesh:
    sidecars: dict[str, FakeSidecar]
    events: compliance_monitor.EventLog

    def neighbours(self, session: aiohttp.ClientSession) -> Neighbours:
        """The edge client's way in, through the edge's (fake) sidecar."""
        return Neighbours(session, AppSettings(outbound=self.sidecars[EDGE].url))


async def start_sidecar(aiohttp_server: ServerFactory, name: str) -> FakeSidecar:
    sidecar = FakeSidecar(name)
    server = await aiohttp_server(sidecar.app())
    sidecar.url = str(server.make_url("")).rstrip("/")
    return sidecar


@pytest.fixture
async def mesh(aiohttp_server: ServerFactory) -> Mesh:
    """All four apps, each calling out through its own fake sidecar."""
    sidecars = {name: await start_sidecar(aiohttp_server, name) for name in SERVICES}
    urls = {}
    events = None
    for name, module in MODULES.items():
        app = module.make_app(AppSettings(outbound=sidecars[name].url))
        if name == "compliance-monitor":
            events = app[compliance_monitor.EVENTS]
        urls[name] = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    for sidecar in sidecars.values():
        sidecar.apps = dict(urls)
    assert events is not None
    return Mesh(sidecars=sidecars, events=events)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def app_behind(
    aiohttp_client: ClientFactory, aiohttp_server: ServerFactory, name: str
) -> tuple[TestClient[Any, Any], FakeSidecar]:
    """One app with a test client in front and a fake sidecar behind it."""
    sidecar = await start_sidecar(aiohttp_server, name)
    app = MODULES[name].make_app(AppSettings(outbound=sidecar.url))
    return await aiohttp_client(app), sidecar


# -- settings -------------------------------------------------------------------------


def test_apps_default_to_loopback_and_the_local_sidecar() -> None:
    settings = settings_from({}, [])
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.url_for("billing-engine") == "http://127.0.0.1:15001/billing-engine"


def test_environment_then_flags_choose_the_addresses() -> None:
    env = {
        "APP_HOST": "127.0.0.2",
        "APP_PORT": "9000",
        "SIDECAR_OUTBOUND": "http://127.0.0.1:25001/",
    }
    settings = settings_from(env, [])
    assert (settings.host, settings.port) == ("127.0.0.2", 9000)
    assert settings.url_for("billing-engine") == "http://127.0.0.1:25001/billing-engine"
    flagged = settings_from(env, ["--port", "9100", "--outbound", "http://127.0.0.1:35001"])
    assert flagged.port == 9100
    assert flagged.url_for("billing-engine") == "http://127.0.0.1:35001/billing-engine"


def test_a_service_url_replaces_the_sidecar_route() -> None:
    settings = settings_from({"BILLING_ENGINE_URL": "http://billing-engine:8000/"}, [])
    assert settings.url_for("billing-engine") == "http://billing-engine:8000"
    assert settings.url_for("compliance-monitor") == "http://127.0.0.1:15001/compliance-monitor"


# -- each app -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(APPS))
async def test_every_app_answers_health(aiohttp_client: ClientFactory, name: str) -> None:
    app = await aiohttp_client(MODULES[name].make_app(AppSettings()))
    response = await app.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "service": name}


async def test_coverage_is_read_and_the_caller_echoed(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "insurance-verification")
    response = await app.get(
        "/patients/TEST-PATIENT-001/coverage",
        headers={"x-source-service": "healthcare-api", "traceparent": TRACEPARENT},
    )
    body = await response.json()
    assert response.status == 200
    assert body["coverage"]["active"] is True
    assert (body["source_service"], body["trace_id"]) == ("healthcare-api", TRACE_ID)
    assert (await app.get("/patients/NOBODY/coverage")).status == 404
    assert sidecar.seen == []


async def test_a_verification_is_made_and_voided_once_per_key(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "insurance-verification")
    asked = {"patient_id": "TEST-PATIENT-001", "encounter_id": "ENC-1"}
    key = {"Idempotency-Key": "S-1:verify:action", "traceparent": TRACEPARENT}
    first = await app.post("/verifications", json=asked, headers=key)
    again = await app.post("/verifications", json=asked, headers=key)
    assert (first.status, again.status) == (201, 201)
    made, replayed = await first.json(), await again.json()
    assert replayed["replayed"] is True and replayed["verification"] == made["verification"]
    verification = made["verification"]
    assert (verification["verification_id"], verification["status"]) == ("VER-000001", "valid")
    # Reported once, through the sidecar's fan-out, under a key of its own.
    (report,) = sidecar.calls_to("_sidecar")
    assert (report.path, report.headers["idempotency-key"]) == ("/v1/fanout",
                                                                "VER-000001:verified")
    assert report.body["targets"] == ["compliance-monitor"]
    assert report.body["body"]["kind"] == "coverage-verified"
    assert report.headers["traceparent"] == TRACEPARENT
    assert made["calls"] == [{"service": "compliance-monitor", "status": 202, "via": "fan-out",
                              "reason": None, "fanout": "F-insurance-verification-1"}]
    undo = {"Idempotency-Key": "S-1:verify:compensation"}
    voided = await app.post("/verifications/VER-000001/void", headers=undo)
    assert voided.status == 200 and (await voided.json())["verification"]["status"] == "void"
    assert (await app.post("/verifications/VER-000001/void", headers=undo)).status == 200
    assert len(sidecar.calls_to("_sidecar")) == 2
    assert (await app.post("/verifications/VER-9/void", headers={"Idempotency-Key": "x"})
            ).status == 404
    for patient, status in (("TEST-PATIENT-003", 422), ("NOBODY", 404)):
        refused = await app.post("/verifications", json={**asked, "patient_id": patient},
                                 headers={"Idempotency-Key": f"k-{patient}"})
        assert refused.status == status, patient
    assert (await app.post("/verifications", json=asked)).status == 400  # no key


async def test_a_claim_is_filed_and_cancelled_once_per_key(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "billing-engine")
    claim = {
        "encounter_id": "ENC-1",
        "patient_id": "TEST-PATIENT-001",
        "amount_cents": 12_500,
        "copay_cents": 2_500,
    }
    first = await app.post("/claims", json=claim, headers={"Idempotency-Key": "k-1"})
    again = await app.post("/claims", json=claim, headers={"Idempotency-Key": "k-1"})
    assert (first.status, again.status) == (201, 200)
    filed, replayed = await first.json(), await again.json()
    assert replayed["replayed"] is True and replayed["claim"] == filed["claim"]
    assert replayed["calls"] == filed["calls"]  # the first answer, again
    assert (filed["claim"]["patient_owes_cents"], filed["claim"]["payer_owes_cents"]) == (
        2_500, 10_000)
    assert [c.body["body"]["kind"] for c in sidecar.calls_to("_sidecar")] == ["claim-submitted"]
    claim_id = filed["claim"]["claim_id"]
    fetched = await app.get(f"/claims/{claim_id}")
    assert (await fetched.json())["claim"] == filed["claim"]
    for _ in range(2):
        cancelled = await app.post(f"/claims/{claim_id}/cancel",
                                   headers={"Idempotency-Key": "k-1:undo"})
        assert (await cancelled.json())["claim"]["status"] == "cancelled"
    assert [c.body["body"]["kind"] for c in sidecar.calls_to("_sidecar")] == [
        "claim-submitted", "claim-cancelled"]


async def test_a_claim_needs_a_key_and_a_sane_amount(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "billing-engine")
    claim = {"encounter_id": "ENC-1", "patient_id": "TEST-PATIENT-001", "amount_cents": 100}
    assert (await app.post("/claims", json=claim)).status == 400
    for amount in (0, -5, True, "100", 10**9):
        bad = await app.post(
            "/claims",
            json={**claim, "amount_cents": amount},
            headers={"Idempotency-Key": f"k-{amount}"},
        )
        assert bad.status == 400, amount
    assert sidecar.seen == []


async def test_compliance_keeps_who_reported_what_once_per_key(
        aiohttp_client: ClientFactory) -> None:
    app = await aiohttp_client(compliance_monitor.make_app(AppSettings()))
    for _ in range(2):  # delivered twice (at least once): stored once
        sent = await app.post(
            "/events",
            json={"kind": "claim-submitted", "claim_id": "CLM-1"},
            headers={"x-source-service": "billing-engine", "traceparent": TRACEPARENT,
                     "Idempotency-Key": "F-1:compliance-monitor"},
        )
        assert sent.status == 202
    listed = await (await app.get("/events")).json()
    (event,) = listed["events"]
    assert event["reported_by"] == "billing-engine"
    assert (event["kind"], event["trace_id"]) == ("claim-submitted", TRACE_ID)
    assert (await app.post("/events", json={"no": "kind"})).status == 400
    assert (await app.post("/events", data=b"[1, 2]")).status == 400


async def test_compliance_verifies_each_sidecar_s_shipped_chain(
        aiohttp_client: ClientFactory) -> None:
    app = await aiohttp_client(compliance_monitor.make_app(AppSettings()))
    log = AuditLog(None)  # the sidecar's own records, chained, kept in memory
    records = [log.record(direction="outbound", source="a", target="b", method="GET",
                          route="/claims/{id}", status=200, decision="allowed", reason=None,
                          duration_ms=1.0, attempts=1, trace_id=f"{n:032x}")
               for n in range(5)]
    for batch in (records[:3], records[2:]):  # at least once: the overlap is dropped
        sent = await app.post("/audit/records", json={"sidecar": "a", "records": batch})
        assert sent.status == 200
    forged = {**records[4], "status": 500}
    await app.post("/audit/records", json={"sidecar": "b", "records": records[:2]})
    await app.post("/audit/records", json={"sidecar": "b", "records": [forged]})
    chains = (await (await app.get("/audit/chains")).json())["chains"]
    assert chains["a"] == {"records": 5, "received": 6, "intact": True, "problems": []}
    assert chains["b"]["intact"] is False
    assert chains["b"]["problems"] == ["record 3: hash does not match (edited)"]
    assert (await app.post("/audit/records", json={"records": []})).status == 400


# -- the encounter ----------------------------------------------------------------------


async def test_an_encounter_is_a_saga_through_all_four_services(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    answer = await client.post_encounter(
        mesh.neighbours(session), "TEST-PATIENT-001", context={"traceparent": TRACEPARENT}
    )
    assert answer.status == 201
    body = answer.body
    assert body["source_service"] == EDGE and body["trace_id"] == TRACE_ID
    assert body["claim"]["encounter_id"] == body["encounter_id"]
    assert body["claim"]["patient_owes_cents"] == 2_500  # the copay, from the verify step
    assert body["coverage"]["plan"].startswith("Synthetic Gold")
    assert body["saga"]["state"] == "completed"
    assert [s["name"] for s in body["saga"]["steps"]] == ["verify", "claim", "notify"]
    verified, claimed = body["calls"]
    assert (verified["service"], verified["status"]) == ("insurance-verification", 201)
    assert (claimed["service"], claimed["status"]) == ("billing-engine", 201)
    # Each step's app saw the caller the mesh vouched for.
    assert verified["source_service"] == claimed["source_service"] == "healthcare-api"
    assert verified["calls"][0]["via"] == claimed["calls"][0]["via"] == "fan-out"
    reporters = sorted(event["reported_by"] for event in mesh.events.events)
    assert reporters == ["billing-engine", "insurance-verification"]
    # One saga, keyed by the encounter, carrying the caller's trace context.
    (saga,) = mesh.sidecars["healthcare-api"].calls_to("_sidecar")
    assert saga.headers["idempotency-key"] == f"encounter-{body['encounter_id']}"
    assert saga.headers["traceparent"] == TRACEPARENT
    steps = saga.body["steps"]
    assert [(s["name"], s["action"]["service"]) for s in steps] == [
        ("verify", "insurance-verification"), ("claim", "billing-engine"),
        ("notify", "healthcare-api")]
    assert steps[0]["compensation"]["path"].endswith("/void")
    assert steps[1]["compensation"]["path"].endswith("/cancel")


async def test_the_same_encounter_again_is_the_same_saga(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    first = await client.post_encounter(mesh.neighbours(session), "TEST-PATIENT-002",
                                        encounter_id="ENC-TWICE")
    again = await client.post_encounter(mesh.neighbours(session), "TEST-PATIENT-002",
                                        encounter_id="ENC-TWICE")
    assert (first.status, again.status) == (201, 201)
    assert first.body["saga"]["id"] == again.body["saga"]["id"]
    assert len(mesh.sidecars["healthcare-api"].calls_to("billing-engine")) == 1


async def test_no_coverage_is_422_and_bills_nothing(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    for patient, why in (("TEST-PATIENT-003", "coverage is not active"),
                         ("NOBODY-999", "no coverage on file")):
        answer = await client.post_encounter(mesh.neighbours(session), patient)
        assert (answer.status, answer.body["error"]) == (422, why), patient
        assert answer.body["saga"]["state"] == "compensated"
    assert mesh.sidecars["healthcare-api"].calls_to("billing-engine") == []


async def test_a_refused_claim_rolls_the_encounter_back(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    answer = await client.post_encounter(mesh.neighbours(session), "TEST-PATIENT-001",
                                         amount_cents=20_000_000)  # over billing's limit
    assert answer.status == 409
    assert answer.body["failed"] == "billing-engine"
    assert answer.body["error"] == "claim did not complete; the encounter was rolled back"
    steps = {s["name"]: s["status"] for s in answer.body["saga"]["steps"]}
    assert steps == {"verify": "compensated", "claim": "failed", "notify": "pending"}
    hops = mesh.sidecars["healthcare-api"].calls_to("insurance-verification")
    assert [hop.path for hop in hops] == ["/verifications", "/verifications/VER-000001/void"]
    kinds = [event["kind"] for event in mesh.events.events]
    assert kinds == ["coverage-verified", "verification-voided"]


async def test_a_sidecar_that_refuses_or_is_away_is_502(
    mesh: Mesh,
    session: aiohttp.ClientSession,
    aiohttp_client: ClientFactory,
    unused_port: int,
) -> None:
    mesh.sidecars["healthcare-api"].script["_sidecar"] = lambda seen: problem(404, "no_route")
    refused = await client.post_encounter(mesh.neighbours(session), "TEST-PATIENT-001")
    assert (refused.status, refused.body["failed"]) == (502, "sidecar")
    assert refused.body["calls"][0]["reason"] == "no_route"
    app = await aiohttp_client(
        healthcare_api.make_app(AppSettings(outbound=f"http://127.0.0.1:{unused_port}"))
    )
    response = await app.post("/encounters", json={"patient_id": "TEST-PATIENT-001"})
    body = await response.json()
    assert response.status == 502
    assert body["calls"][0]["status"] is None and body["calls"][0]["error"]
    assert (await app.post("/encounters", json={"amount_cents": 1})).status == 400
    for amount in (0, "12", False):
        bad = {"patient_id": "TEST-PATIENT-001", "amount_cents": amount}
        assert (await app.post("/encounters", json=bad)).status == 400, amount


# -- the client -----------------------------------------------------------------------


async def test_the_client_prints_each_encounter_as_a_call_tree(
    mesh: Mesh,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = await client.amain(
        [
            "--outbound",
            mesh.sidecars[EDGE].url,
            "encounter",
            "--patient",
            "TEST-PATIENT-002",
            "--count",
            "2",
        ],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("-> healthcare-api 201 (caller seen: edge)") == 2
    assert "-> billing-engine 201 (caller seen: healthcare-api)" in out
    assert "-> compliance-monitor 202 (queued by its sidecar: fan-out)" in out
    assert len(mesh.events.events) == 4


async def test_the_client_shows_a_refused_call(
    mesh: Mesh,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mesh.sidecars[EDGE].script["billing-engine"] = lambda seen: problem(403, "policy_denied")
    status = await client.amain(
        [
            "--outbound",
            mesh.sidecars[EDGE].url,
            "call",
            "POST",
            "billing-engine",
            "/claims",
            "--body",
            "{}",
        ],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "POST billing-engine/claims -> 403 policy_denied" in out
    assert mesh.sidecars[EDGE].calls_to("billing-engine")[0].body == {}


def test_render_tree_marks_calls_that_got_no_answer() -> None:
    lines = client.render_tree(
        {
            "service": "a",
            "status": 502,
            "source_service": "edge",
            "calls": [{"service": "b", "status": None, "error": "ClientConnectorError"}],
        }
    )
    assert lines == [
        "-> a 502 (caller seen: edge)",
        "  -> b --- ClientConnectorError (caller seen: -)",
    ]


# -- as processes -----------------------------------------------------------------------


@pytest.fixture
def unused_port() -> int:
    return free_port()


async def test_each_module_serves_on_its_own() -> None:
    """`python -m deploy.apps.<module>` serves where APP_HOST and --port say."""
    ports = dict(zip(APPS, free_ports(len(APPS)), strict=True))
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "--port",
            str(ports[name]),
            cwd=REPO,
            stderr=asyncio.subprocess.DEVNULL,
            env={"APP_HOST": "127.0.0.1"},
        )
        for name, module in APPS.items()
    ]
    try:
        async with aiohttp.ClientSession() as s:
            for name, port in ports.items():
                assert await _health(s, port) == {"status": "ok", "service": name}
                # The accept queue is as deep as the sidecar's (aiohttp's default, 128,
                # would drop a burst of the sidecar's connects past it).
                assert _backlog(port) == 1024, name
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        codes = [await asyncio.wait_for(process.wait(), timeout=10) for process in processes]
    assert codes == [0] * len(processes), "SIGTERM stops each app cleanly"


def _backlog(port: int) -> int:
    """The listen backlog of the socket on 127.0.0.1:`port`: `ss` (iproute2, as `ip` for
    the topology tests) shows it as Send-Q, capped at net.core.somaxconn."""
    listed = subprocess.run(["ss", "-ltnH", f"src 127.0.0.1:{port}"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.splitlines()
    assert len(listed) == 1, f"one listener on 127.0.0.1:{port} expected: {listed}"
    state, _, send_q, *_ = listed[0].split()
    assert state == "LISTEN", listed
    return int(send_q)


async def _health(s: aiohttp.ClientSession, port: int) -> Any:
    # Waits for start-up (a new interpreter), not for time to pass in a test.
    for _ in range(200):
        try:
            async with s.get(f"http://127.0.0.1:{port}/health") as response:
                return await response.json()
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing answered on 127.0.0.1:{port}")
