"""The example services, run in-process on 127.0.0.1 with fake sidecars.

A `FakeSidecar` stands in for one app's outbound sidecar: it records what the
app sent and answers from a script, or passes the call to the real target app
the way the mesh would (with `x-source-service` set to the caller). Wiring one
per service gives the whole encounter workflow without a real sidecar.
"""

from __future__ import annotations

import asyncio
import json
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
    """One app's outbound sidecar, minus the sidecar: records, then scripts or forwards."""

    name: str
    seen: list[Seen] = field(default_factory=list)
    script: dict[str, Callable[[Seen], web.Response]] = field(default_factory=dict)
    apps: dict[str, str] = field(default_factory=dict)  # service -> its app's base URL
    url: str = ""
    session: aiohttp.ClientSession | None = None

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
        if seen.service not in self.apps:
            return problem(404, "no_route")
        headers = {k: v for k, v in seen.headers.items() if k in FORWARDED}
        headers["x-source-service"] = self.name  # what the target's sidecar would vouch for
        assert self.session is not None
        async with self.session.request(
            seen.method, self.apps[seen.service] + seen.path, data=raw, headers=headers
        ) as answer:
            return web.Response(
                body=await answer.read(), status=answer.status, content_type=answer.content_type
            )


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


async def test_coverage_is_reported_and_the_caller_echoed(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "insurance-verification")
    sidecar.script["compliance-monitor"] = lambda seen: web.json_response({}, status=202)
    response = await app.get(
        "/patients/TEST-PATIENT-001/coverage",
        headers={
            "x-source-service": "healthcare-api",
            "traceparent": TRACEPARENT,
            "baggage": "user=x",
        },
    )
    body = await response.json()
    assert response.status == 200
    assert body["coverage"]["active"] is True
    assert (body["source_service"], body["trace_id"]) == ("healthcare-api", TRACE_ID)
    (report,) = sidecar.calls_to("compliance-monitor")
    assert (report.method, report.path) == ("POST", "/events")
    assert report.body["kind"] == "coverage-checked"
    assert report.headers["traceparent"] == TRACEPARENT
    assert "baggage" not in report.headers and "x-source-service" not in report.headers


async def test_coverage_answers_even_when_compliance_is_down(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "insurance-verification")
    sidecar.script["compliance-monitor"] = lambda seen: problem(503, "circuit_open")
    response = await app.get("/patients/TEST-PATIENT-002/coverage")
    body = await response.json()
    assert response.status == 200
    assert body["calls"][0]["status"] == 503
    assert body["calls"][0]["reason"] == "circuit_open"
    missing = await app.get("/patients/NOBODY/coverage")
    assert missing.status == 404


async def test_a_claim_is_filed_once_per_idempotency_key(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
) -> None:
    app, sidecar = await app_behind(aiohttp_client, aiohttp_server, "billing-engine")
    sidecar.script["compliance-monitor"] = lambda seen: web.json_response({}, status=202)
    claim = {
        "encounter_id": "ENC-1",
        "patient_id": "TEST-PATIENT-001",
        "amount_cents": 12_500,
        "copay_cents": 2_500,
    }
    first = await app.post("/claims", json=claim, headers={"Idempotency-Key": "k-1"})
    again = await app.post("/claims", json=claim, headers={"Idempotency-Key": "k-1"})
    assert (first.status, again.status) == (201, 200)
    filed, replayed = (await first.json())["claim"], await again.json()
    assert replayed["replayed"] is True and replayed["claim"] == filed
    assert (filed["patient_owes_cents"], filed["payer_owes_cents"]) == (2_500, 10_000)
    assert len(sidecar.calls_to("compliance-monitor")) == 1
    fetched = await app.get(f"/claims/{filed['claim_id']}")
    assert (await fetched.json())["claim"] == filed


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


async def test_compliance_keeps_who_reported_what(aiohttp_client: ClientFactory) -> None:
    app = await aiohttp_client(compliance_monitor.make_app(AppSettings()))
    sent = await app.post(
        "/events",
        json={"kind": "claim-submitted", "claim_id": "CLM-1"},
        headers={"x-source-service": "billing-engine", "traceparent": TRACEPARENT},
    )
    assert sent.status == 202
    listed = await (await app.get("/events")).json()
    (event,) = listed["events"]
    assert event["reported_by"] == "billing-engine"
    assert (event["kind"], event["trace_id"]) == ("claim-submitted", TRACE_ID)
    assert (await app.post("/events", json={"no": "kind"})).status == 400
    assert (await app.post("/events", data=b"[1, 2]")).status == 400


# -- the encounter ----------------------------------------------------------------------


async def test_an_encounter_runs_through_all_four_services(
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
    coverage, claim = body["calls"]
    assert (coverage["service"], coverage["status"]) == ("insurance-verification", 200)
    assert (claim["service"], claim["status"]) == ("billing-engine", 201)
    # Each hop saw the caller the mesh vouched for, down to compliance-monitor.
    assert coverage["source_service"] == claim["source_service"] == "healthcare-api"
    assert coverage["calls"][0]["source_service"] == "insurance-verification"
    assert claim["calls"][0]["source_service"] == "billing-engine"
    reporters = sorted(event["reported_by"] for event in mesh.events.events)
    assert reporters == ["billing-engine", "insurance-verification"]
    # The trace context went along on every call, and no app passed on who called it.
    hops = [seen for sidecar in mesh.sidecars.values() for seen in sidecar.seen]
    assert len(hops) == 5
    assert all(seen.headers.get("traceparent") == TRACEPARENT for seen in hops)
    assert all("x-source-service" not in seen.headers for seen in hops)
    (filed,) = mesh.sidecars["healthcare-api"].calls_to("billing-engine")
    assert filed.headers["idempotency-key"] == f"claim-{body['encounter_id']}"


async def test_no_coverage_is_422_and_bills_nothing(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    for patient in ("TEST-PATIENT-003", "NOBODY-999"):
        answer = await client.post_encounter(mesh.neighbours(session), patient)
        assert answer.status == 422, patient
    assert mesh.sidecars["healthcare-api"].calls_to("billing-engine") == []


async def test_a_failed_dependency_is_502_naming_it_and_the_reason(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    mesh.sidecars["healthcare-api"].script["billing-engine"] = lambda seen: problem(
        503, "circuit_open"
    )
    answer = await client.post_encounter(mesh.neighbours(session), "TEST-PATIENT-001")
    assert answer.status == 502
    assert answer.body["failed"] == "billing-engine"
    failed = answer.body["calls"][1]
    assert (failed["status"], failed["reason"]) == (503, "circuit_open")
    assert failed["answer"]["reason"] == "circuit_open"


async def test_a_mesh_404_is_a_failure_not_a_missing_patient(
    mesh: Mesh,
    session: aiohttp.ClientSession,
) -> None:
    mesh.sidecars["healthcare-api"].script["insurance-verification"] = lambda seen: problem(
        404, "no_route"
    )
    answer = await client.post_encounter(mesh.neighbours(session), "TEST-PATIENT-001")
    assert (answer.status, answer.body["failed"]) == (502, "insurance-verification")


async def test_an_unreachable_sidecar_is_502(
    aiohttp_client: ClientFactory,
    unused_port: int,
) -> None:
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
    assert "-> compliance-monitor 202 (caller seen: billing-engine)" in out
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
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        codes = [await asyncio.wait_for(process.wait(), timeout=10) for process in processes]
    assert codes == [0] * len(processes), "SIGTERM stops each app cleanly"


async def _health(s: aiohttp.ClientSession, port: int) -> Any:
    # Waits for start-up (a new interpreter), not for time to pass in a test.
    for _ in range(200):
        try:
            async with s.get(f"http://127.0.0.1:{port}/health") as response:
                return await response.json()
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing answered on 127.0.0.1:{port}")
