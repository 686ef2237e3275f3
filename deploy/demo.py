"""`make demo`: the example mesh, started, exercised and explained for a newcomer.

    .venv/bin/python -m deploy.demo

It runs the Compose topology of `deploy/`: four example services, each with
its own sidecar, and the `edge` sidecar that outside callers use. As root,
where `ip netns` works, every service gets a network namespace of its own,
exactly as a Compose container (`deploy.netns`); elsewhere everything runs on
127.0.0.1 with a port set per service. Then it drives encounters, each a saga
in healthcare-api's sidecar, shows the identities each app saw, the trace of
each encounter, refused calls (a policy denial, plain text and a client
without a certificate at a strict mTLS port), a saga whose billing step fails
and is compensated, a sidecar killed mid-saga and started again,
compliance-monitor going away with its callers' breakers opening while no
event or audit record is lost, every certificate replaced under load without
a failed call, the audit trail with the SPIFFE IDs of the peers, and stops
everything. Nothing outside 127.0.0.0/8 and the namespaces' own
198.18.0.0/24 is contacted, unless OTEL_EXPORTER_OTLP_ENDPOINT says so.

Environment:

    DEMO_MODE=auto|netns|loopback   auto (default): netns when possible
    DEMO_WORKDIR=DIR                keys, configs, logs, audit logs (default: a new temp dir)
    OTEL_EXPORTER_OTLP_ENDPOINT=URL the sidecars export traces there (e.g. a local Jaeger),
                                    instead of to the demo's own receiver

Exit status 0 when everything happened as narrated, 1 when something did not
(the output says what), 2 when the chosen mode cannot run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

from deploy import narration, netns, traces
from deploy.apps.client import post_encounter
from deploy.apps.common import AppSettings, Neighbours, Reply
from deploy.mesh import CONFIG_DIR, LocalMesh, loopback_placement, netns_placement
from deploy.process import ProcessError
from deploy.topology import APPS, EDGE, SERVICES
from sidecar.tls import certs
from sidecar.workflows.crash import VARIABLE as CRASH_POINT_VARIABLE

TIME_LIMIT = 95.0  # seconds for the whole demo, clean-up excluded
# Short enough to watch: the shipped configs open after 5 failures and probe after 10 s,
# redeliver up to 10 s apart and ship audit records every second.
DEMO_BREAKER = {"failure_threshold": 2, "recovery_timeout": "2s"}
DEMO_REDELIVERY = {"base": "200ms", "max": "1s"}
DEMO_SHIP_INTERVAL = "300ms"
FAILING = "compliance-monitor"  # the dependency the demo stops
REPORTERS = ("insurance-verification", "billing-engine")  # its callers
ORCHESTRATOR = "healthcare-api"  # whose sidecar runs the encounter sagas
CRASH_POINT = "after-action:claim"  # billing-engine has filed the claim; the sidecar dies
TOO_MUCH_CENTS = 20_000_000  # over billing-engine's limit: it refuses the claim
WITHIN = 20.0  # seconds any awaited outcome gets
TRACE_WAIT = 5.0
ROTATION_WORKERS = 4  # encounters at a time while the certificates change
ROTATION_AT_MOST = 400  # encounters, and ...
ROTATION_WITHIN = 20.0  # ... seconds: the load is bounded both ways
ROTATED_DAYS = 60  # the new certificates' validity, so the change shows
RULE = "=" * 72


def heading(title: str) -> None:
    print(f"\n{RULE}\n{title}\n{RULE}", flush=True)


def say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def choose_mode(asked: str) -> tuple[str, str]:
    """("netns" | "loopback", why); "error" when the asked mode cannot run."""
    if asked not in ("auto", "netns", "loopback"):
        return "error", f"DEMO_MODE must be auto, netns or loopback, not {asked!r}"
    if asked == "loopback":
        return "loopback", "DEMO_MODE=loopback"
    reason = netns.unavailable_reason()
    if reason is None:
        return "netns", "running as root and `ip netns` works"
    if asked == "netns":
        return "error", f"DEMO_MODE=netns, but {reason}"
    return "loopback", f"{reason}; set DEMO_MODE=netns as root to use namespaces"


@dataclass
class Encounter:
    """One encounter the demo drove, with the call tree healthcare-api answered."""

    patient: str
    reply: Reply

    @property
    def trace_id(self) -> str | None:
        value = self.reply.field("trace_id")
        return value if isinstance(value, str) else None


@dataclass
class Demo:
    """One run: each section is a method, in the order `run` calls them.

    It owns what it starts (namespaces, processes, receiver, relay) so that
    `amain` and `main` can remove them whatever happens, and collects in
    `problems` anything that did not go as the narration says.
    """

    mode: str
    workdir: Path
    external_traces: str | None  # OTEL_EXPORTER_OTLP_ENDPOINT, when set
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    layout: netns.Layout | None = None
    mesh: LocalMesh | None = None
    receiver: traces.TraceReceiver | None = None
    problems: list[str] = field(default_factory=list)

    # ---- 1. the mesh

    async def start(self) -> None:
        heading("1. Starting the mesh")
        if self.mode == "netns":
            netns.sweep_stale()
            self.layout = netns.plan(list(SERVICES))
            netns.build(self.layout)
            placement = netns_placement(self.layout)
        else:
            placement = loopback_placement(SERVICES)
        tracing_endpoint = await self._trace_sink()
        self.mesh = LocalMesh(
            placement,
            self.workdir,
            tracing_endpoint=tracing_endpoint,
            breaker=DEMO_BREAKER,
            redelivery=DEMO_REDELIVERY,
            ship_interval=DEMO_SHIP_INTERVAL,
            env=self._otel_env(),
        )
        self._describe_sites()
        await self.mesh.prepare()
        keyring = self.mesh.keyring
        say(
            "",
            f"Keys: `sidecar keygen` made one key pair per service in {keyring.keys_dir},",
            f"      `sidecar jwks` merged the public keys into {keyring.jwks_path}.",
            f"Certificates: `sidecar certs ca` made the mesh CA in {self.mesh.certs.ca_dir},",
            "      `sidecar certs issue` one certificate per service in",
            f"      {self.mesh.certs.certs_dir}",
            "      (URI SAN spiffe://intelluxe.local/<service>). Every sidecar runs",
            "      tls.mode strict: port 15006 takes mutual TLS only.",
            f"Configs: deploy/config/*.yaml, rewritten for this machine, in {self.workdir}/config.",
            f"Breakers shortened for the demo: {narration.breaker_text(DEMO_BREAKER)}",
            f"  (deploy/config: {narration.breaker_text(_shipped_breaker())}).",
            "Workflows: every sidecar keeps a workflow store (SQLite, WAL) in",
            f"  {self.workdir}/workflows and ships its audit records to {FAILING}.",
            f"Process logs (sidecars log JSON lines): {self.mesh.logs_dir}",
        )
        started = time.monotonic()
        await self.mesh.start()
        took = time.monotonic() - started
        say(f"All {len(SERVICES)} sidecars ready (/readyz 200) in {took:.1f} s.")

    def _describe_sites(self) -> None:
        assert self.mesh is not None
        if self.mode == "netns":
            assert self.layout is not None
            say(
                "Network namespaces: each service has its own, as a Compose container has:",
                "its app on 127.0.0.1:8000, its sidecar on 127.0.0.1:15001 (outbound),",
                "0.0.0.0:15006 (inbound) and 127.0.0.1:15000 (admin). A bridge in the",
                f"namespace {self.layout.switch} joins them; names resolve through",
                "/etc/netns/<namespace>/hosts. The demo's client speaks from inside the edge",
                "namespace, to the edge sidecar on 127.0.0.1:15001.",
                "",
            )
            for service, site in self.mesh.sites.items():
                say(f"  {service:<24} {site.address:<13} namespace {site.namespace}")
            return
        say(
            "Loopback: everything shares 127.0.0.1, so each service has its own ports",
            "(in Compose or Kubernetes they would all be 8000, 15001, 15006 and 15000):",
            "",
            f"  {'service':<24} {'app':>6} {'outbound':>9} {'inbound':>8} {'admin':>6}",
        )
        for service, site in self.mesh.sites.items():
            app = str(site.app_port) if service in APPS else "-"
            say(
                f"  {service:<24} {app:>6} {site.outbound_port:>9} "
                f"{site.inbound_port:>8} {site.admin_port:>6}"
            )

    async def _trace_sink(self) -> str | None:
        """Where the sidecars' traces go; the config's endpoint to use (None: keep jaeger:4318)."""
        if self.external_traces is None:
            self.receiver = await traces.TraceReceiver().start()
            self.stack.push_async_callback(self.receiver.stop)
            target = ("127.0.0.1", self.receiver.port)
            local = self.receiver.url
        else:
            parts = urlsplit(self.external_traces)
            default_port = 443 if parts.scheme == "https" else 80
            target = (parts.hostname or "localhost", parts.port or default_port)
            local = self.external_traces
        if self.layout is None:
            return local
        # The namespaces have no route out: `jaeger` is the switch, relayed from there.
        listener = netns.listener_in(self.layout.switch, str(netns.SWITCH_ADDRESS), 4318)
        relay = await netns.Relay(listener, target).start()
        self.stack.push_async_callback(relay.stop)
        return None

    def _otel_env(self) -> dict[str, str]:
        # Export every 200 ms, so each encounter's spans arrive while the demo waits.
        env = {"OTEL_BSP_SCHEDULE_DELAY": os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "200")}
        if self.external_traces is not None:  # headers, protocol... for the user's collector
            env |= {
                name: value
                for name, value in os.environ.items()
                if name.startswith("OTEL_EXPORTER_OTLP_") and "ENDPOINT" not in name
            }
        return env

    # ---- 2. encounters

    async def encounters(self) -> list[Encounter]:
        heading("2. Encounters as sagas: verify coverage -> file the claim -> notify")
        say(
            "healthcare-api hands each encounter to its own sidecar as a saga",
            "(POST 127.0.0.1:15001/_sidecar/v1/sagas): three steps, each with its",
            "compensation, run durably by the sidecar and sent through its outbound stack",
            "with a signed token, so each callee's sidecar verifies the caller and hands",
            "the app the verified name in x-source-service. The apps report compliance",
            "events by fan-out: their sidecar stores each one and delivers it. Every app",
            "echoes what it saw:",
        )
        done = []
        for patient in ("TEST-PATIENT-001", "TEST-PATIENT-002", "TEST-PATIENT-003"):
            reply = await self._encounter(patient)
            done.append(Encounter(patient, reply))
            say("", f"Encounter for {patient}: {narration.status_text(reply)}")
            say(f"  saga: {narration.saga_text(reply.field('saga'))}")
            say(*narration.call_lines(EDGE, reply.summary(), depth=1))
        ok = [e for e in done if e.reply.ok]
        if len(ok) != 2 or not all(narration.callers_verified(EDGE, e.reply.summary()) for e in ok):
            self.problems.append("the encounters did not all go through as expected")
        say(
            "",
            "TEST-PATIENT-003's coverage has lapsed: the verify step is refused (422), the",
            "saga ends compensated with nothing to undo, and nothing is billed.",
        )
        return done

    async def _encounter(self, patient: str, **fields: Any) -> Reply:
        assert self.mesh is not None
        async with self.mesh.session(EDGE) as session:
            edge = Neighbours(session, AppSettings(outbound=self.mesh.sites[EDGE].outbound_url))
            return await post_encounter(edge, patient, **fields)

    # ---- 3. traces

    async def traces(self, encounters: list[Encounter]) -> None:
        heading("3. One trace per encounter")
        if self.receiver is None:
            say(
                f"The sidecars export to {self.external_traces} (OTEL_EXPORTER_OTLP_ENDPOINT).",
                "Look the trace ids up there; here is the call tree the apps reported:",
            )
            for encounter in encounters:
                say("", f"trace {encounter.trace_id}  ({encounter.patient})")
                say(*narration.call_lines(EDGE, encounter.reply.summary(), depth=1))
            return
        say(
            "Every sidecar sends its spans (OTLP/HTTP) to the demo's own receiver. Client spans",
            "are made by the calling sidecar, server spans by the called one, an internal span",
            "for each saga step and fan-out delivery; the apps only pass `traceparent` on.",
        )
        for encounter in encounters:
            if encounter.trace_id is None:
                self.problems.append(f"no trace id in the answer for {encounter.patient}")
                continue
            tree = encounter.reply.summary()
            expected = narration.services_in(EDGE, tree)
            wanted = narration.spans_expected(tree, encounter.reply.field("saga"))
            spans = await self.receiver.wait_for_trace(
                encounter.trace_id, services=expected, spans=wanted, within=TRACE_WAIT
            )
            seen = {span.service for span in spans}
            say(
                "",
                f"trace {encounter.trace_id}  ({encounter.patient}: {len(spans)} spans "
                f"from {len(seen)} sidecars)",
            )
            say(*("  " + line for line in traces.tree_lines(spans)))
            if not expected <= seen or len(spans) < wanted:
                self.problems.append(f"trace {encounter.trace_id} arrived incomplete")

    # ---- 4. refusals

    async def refusals(self) -> None:
        assert self.mesh is not None
        heading("4. Refused calls: problem+json from the sidecar, the app never sees them")
        say(
            "The edge asks billing-engine for a claim directly. Its token is valid, but",
            "billing-engine's policy admits only healthcare-api:",
            "",
        )
        async with self.mesh.session(EDGE) as session:
            edge = Neighbours(session, AppSettings(outbound=self.mesh.sites[EDGE].outbound_url))
            denied = await edge.call(
                "billing-engine", "POST", "/claims", context={}, json={"amount_cents": 100}
            )
        say(f"POST billing-engine /claims -> {denied.status}, x-sidecar-reason: {denied.reason}")
        say(*narration.indented(json.dumps(denied.body, indent=2)))
        if denied.status != 403 or denied.reason != "policy_denied":
            self.problems.append(f"expected 403 policy_denied, got {denied.status}")

        target = self.mesh.sites["healthcare-api"]
        say(
            "",
            "A caller that skips its sidecar has neither token nor certificate. From the",
            f"edge's network straight to healthcare-api's inbound port ({target.inbound_url}),",
            "in plain text:",
            "",
        )
        async with self.mesh.session(EDGE) as session:
            async with session.post(target.inbound_url + "/encounters", json={}) as response:
                body = await response.text()
                status = response.status
                reason = response.headers.get("x-sidecar-reason")
        say(f"POST {target.inbound_url}/encounters -> {status}, x-sidecar-reason: {reason}")
        say(*narration.indented(narration.pretty(body)))
        if status != 400 or reason != "tls_required":
            self.problems.append(f"expected 400 tls_required, got {status}")
        tls_url = f"https://{target.address}:{target.inbound_port}/encounters"
        say(
            "",
            "The same with TLS, trusting the mesh CA but showing no client certificate:",
            "",
        )
        context = ssl.create_default_context(cafile=str(self.mesh.certs.ca_file))
        async with self.mesh.session(EDGE) as session:
            try:
                async with session.post(tls_url, json={}, ssl=context,
                                        server_hostname="healthcare-api") as response:
                    outcome = f"{response.status} (it should not have been let in)"
                    self.problems.append("a client without a certificate was answered")
            except (aiohttp.ClientError, OSError) as exc:
                outcome = f"refused during the TLS handshake ({type(exc).__name__})"
        say(f"POST {tls_url} -> {outcome}",
            "  healthcare-api's audit log records it as 400 tls_required; its app saw nothing.")

    # ---- 5. a saga that fails and is compensated

    async def rollback(self) -> None:
        heading("5. A saga whose billing step fails: the verification is voided")
        say(
            f"An encounter for {TOO_MUCH_CENTS} cents: insurance-verification verifies the",
            "coverage, billing-engine refuses the claim (400, over its limit). A 4xx fails",
            "the saga at once; the sidecar runs the completed steps' compensations in",
            "reverse (here: void the verification), each with its own Idempotency-Key:",
            "",
        )
        reply = await self._encounter("TEST-PATIENT-001", amount_cents=TOO_MUCH_CENTS)
        saga = reply.field("saga")
        say(f"Encounter: {narration.status_text(reply)}: {reply.field('error')}")
        say(f"  saga: {narration.saga_text(saga)}")
        steps = {step["name"]: step["status"] for step in (saga or {}).get("steps", [])}
        if reply.status != 409 or (saga or {}).get("state") != "compensated" or steps != {
            "verify": "compensated", "claim": "failed", "notify": "pending"
        }:
            self.problems.append("the failed claim was not compensated as described")

    # ---- 6. a sidecar killed mid-saga

    async def crash(self) -> None:
        assert self.mesh is not None
        heading(f"6. {ORCHESTRATOR}'s sidecar is killed mid-saga, and started again")
        sidecar = self.mesh.sidecars[ORCHESTRATOR]
        await sidecar.stop()
        sidecar.env[CRASH_POINT_VARIABLE] = CRASH_POINT
        await self.mesh.start_sidecar(ORCHESTRATOR)
        say(
            f"Restarted {ORCHESTRATOR}'s sidecar with {CRASH_POINT_VARIABLE}={CRASH_POINT}: it",
            "SIGKILLs itself right after billing-engine has filed the claim and before the",
            "sidecar has recorded that: the worst moment. Every transition is written to the",
            "store before the call it leads to, so the saga is not lost:",
            "",
        )
        encounter_id = "ENC-DEMO-CRASH"
        first = await self._encounter("TEST-PATIENT-002", encounter_id=encounter_id)
        code = await sidecar.wait_exit(10)
        say(f"  the encounter's answer: {narration.status_text(first)} "
            f"(the sidecar exited with {code}: SIGKILL)")
        del sidecar.env[CRASH_POINT_VARIABLE]
        await self.mesh.start_sidecar(ORCHESTRATOR)
        again = await self._encounter("TEST-PATIENT-002", encounter_id=encounter_id)
        saga = again.field("saga") or {}
        claim = next((s for s in saga.get("steps", []) if s["name"] == "claim"), {})
        billed = next((n for n in again.field("calls") or [] if n.get("service") ==
                       "billing-engine"), {})
        say(
            "  started again; the saga resumed and sent the claim step again, with the same",
            f"  key: billing-engine answered {billed.get('status')} (replayed: "
            f"{billed.get('replayed')}), one claim.",
            f"  The client posted {encounter_id} again: {narration.status_text(again)}",
            f"  saga: {narration.saga_text(saga)}; claim attempts: {claim.get('attempts')}",
        )
        if code != -9 or again.status != 201 or billed.get("replayed") is not True:
            self.problems.append("the saga did not resume as described after the kill")

    # ---- 7. compliance-monitor away, 8. back

    async def compliance_away(self) -> list[str]:
        assert self.mesh is not None
        heading(f"7. {FAILING} stops: nothing is lost, its callers' breakers open")
        code = await self.mesh.stop_app(FAILING)
        say(
            f"Stopped the {FAILING} app (SIGTERM, exit {code}); its sidecar answers 503",
            "upstream_connect_failure. Encounters still succeed: the compliance events wait",
            "in their sidecars' fan-outs, retried with backoff, and every sidecar's audit",
            "records wait behind their shipping cursor. The failed deliveries count against",
            f"the breakers of {' and '.join(REPORTERS)}:",
            "",
        )
        ids = []
        for number, patient in enumerate(("TEST-PATIENT-001", "TEST-PATIENT-002"), start=1):
            reply = await self._encounter(patient)
            ids.append(str(reply.field("encounter_id")))
            say(f"  encounter {number}: {narration.status_text(reply)}")
        await self._wait(lambda: self._breakers_are("open"), "the breakers to open")
        await self._show_breakers("Breakers, from each caller's admin port (/admin/services):")
        await self._show_circuit_metric(REPORTERS[0])
        say("", "Waiting deliveries, from each caller's /admin/workflows:")
        for caller in REPORTERS:
            _, state = await self.mesh.admin(caller, "/admin/workflows")
            say(f"  {caller}: fan-outs {state['fanouts']}, dead letters {state['dead_letters']}")
        return ids

    async def compliance_back(self, ids: list[str]) -> None:
        assert self.mesh is not None
        heading(f"8. {FAILING} comes back: the events and audit records arrive")
        self.mesh.start_app(FAILING)
        await self.mesh.wait_ready(FAILING)
        say(
            f"Started the {FAILING} app again (its memory is empty). Each open breaker lets",
            f"one probe through {DEMO_BREAKER['recovery_timeout']} after opening; the next",
            "redelivery succeeds and closes it. The events of the two encounters, each",
            "stored once (its Idempotency-Key), as compliance-monitor lists them:",
            "",
        )
        events = await self._wait(lambda: self._events_for(ids), "the held events") or []
        for event in events:
            say(f"  event {event['event_id']}: {event['kind']:<18} reported by "
                f"{event['reported_by']:<22} encounter {event['encounter_id']}")
        await self._wait(lambda: self._breakers_are("closed"), "the breakers to close")
        await self._show_breakers("Breakers now:")
        chains = await self._wait(self._all_chains, "every sidecar's audit records") or {}
        say("", f"{FAILING}'s GET /audit/chains: each sidecar's shipped records, deduplicated,",
            "each one hashed and linked to the one before:")
        for name, chain in chains.items():
            say(f"  {name:<24} {chain['records']:>4} records, intact: {chain['intact']}")
        if not all(chain["intact"] for chain in chains.values()):
            self.problems.append("a shipped audit chain did not verify")

    async def _wait(self, check: Any, what: str) -> Any:
        ends = time.monotonic() + WITHIN
        while time.monotonic() < ends:
            found = await check()
            if found:
                return found
            await asyncio.sleep(0.2)
        self.problems.append(f"gave up waiting for {what}")
        return None

    async def _breakers_are(self, state: str) -> bool:
        assert self.mesh is not None
        states = [await self.mesh.breaker_state(caller, FAILING) for caller in REPORTERS]
        return states == [state] * len(REPORTERS)

    async def _events_for(self, ids: list[str]) -> list[dict[str, Any]]:
        """The two events of each encounter in `ids` (coverage, claim), once all are there."""
        listed = await self._edge_get(FAILING, "/events")
        events = [e for e in (listed or {}).get("events", []) if e.get("encounter_id") in ids]
        return events if len(events) == 2 * len(ids) else []

    async def _all_chains(self) -> dict[str, Any]:
        listed = await self._edge_get(FAILING, "/audit/chains")
        chains = (listed or {}).get("chains", {})
        return chains if set(SERVICES) <= set(chains) else {}

    async def _edge_get(self, service: str, path: str) -> Any:
        assert self.mesh is not None
        async with self.mesh.session(EDGE) as session:
            edge = Neighbours(session, AppSettings(outbound=self.mesh.sites[EDGE].outbound_url))
            answer = await edge.call(service, "GET", path, context={})
        return answer.body if answer.ok else None

    async def _show_breakers(self, title: str) -> None:
        assert self.mesh is not None
        say("", title)
        for caller in REPORTERS:
            state = await self.mesh.breaker_state(caller, FAILING)
            say(f"  {caller} -> {FAILING}: {state}")

    async def _show_circuit_metric(self, caller: str) -> None:
        assert self.mesh is not None
        _, text = await self.mesh.admin(caller, "/metrics")
        lines = [
            line
            for line in str(text).splitlines()
            if (line.startswith("sidecar_circuit_state{") and f'peer="{FAILING}"' in line)
            or line.startswith("sidecar_deliveries_total{")
        ]
        if lines:
            say("", f"The same in {caller}'s Prometheus metrics (/metrics):")
            say(*("  " + line for line in lines))

    # ---- 7. rotation

    async def rotation(self) -> None:
        assert self.mesh is not None
        heading("9. Every certificate replaced under load: no call fails")
        ring = self.mesh.certs
        say(
            f"Encounters keep coming, {ROTATION_WORKERS} at a time, while each service gets a new",
            f"key and certificate ({ROTATED_DAYS} days) from the mesh CA, renamed into place as a",
            "Kubernetes Secret update or `keygen RENEW=...` does. Each sidecar notices within",
            "two seconds, checks the files (key, chain, SPIFFE ID) and uses them for new",
            "connections; calls on open connections finish on the old certificate.",
            "",
        )
        before = {service: _not_after(ring.cert_file(service)) for service in SERVICES}
        reloads = {service: self._reloads(service) for service in SERVICES}
        load = _Load(self)
        running = asyncio.ensure_future(load.run())
        try:
            await asyncio.sleep(0.5)  # under way first
            for service in SERVICES:
                ring.issue(service, days=ROTATED_DAYS)
            ends = time.monotonic() + 10
            # Polled: the sidecars tell only their logs.
            while time.monotonic() < ends and any(  # noqa: ASYNC110
                    self._reloads(s) <= reloads[s] for s in SERVICES):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # and on over the new certificates for a while
        finally:
            load.stop.set()
            await running
        for service in SERVICES:
            reloaded = self._reloads(service) > reloads[service]
            say(f"  {service:<24} not after {before[service]} -> "
                f"{_not_after(ring.cert_file(service))}"
                f"{'' if reloaded else '  (NOT reloaded)'}")
            if not reloaded:
                self.problems.append(f"{service}'s sidecar did not reload its certificate")
        say("", f"{load.encounters} encounters ({load.calls} calls between sidecars) during "
                f"the rotation: {load.failed} failed.")
        if load.failed or not load.encounters:
            self.problems.append(f"{load.failed} calls failed during the certificate rotation")
        _, text = await self.mesh.admin("healthcare-api", "/metrics")
        lines = [line for line in str(text).splitlines()
                 if line.startswith("sidecar_certificate_expiry_seconds{")]
        say("", "healthcare-api's /metrics, seconds until its certificate and CA expire:",
            *(f"  {line}  ({float(line.split()[-1]) / 86400:.1f} days)" for line in lines))

    def _reloads(self, service: str) -> int:
        assert self.mesh is not None
        log = self.mesh.sidecars[service].stdout_path
        try:
            return log.read_text().count('"msg":"certificates reloaded"')
        except OSError:
            return 0

    # ---- 8. stop

    async def stop(self) -> None:
        assert self.mesh is not None
        heading("10. Stopping: apps first, then their sidecars (SIGTERM, drain, exit 0)")
        codes = await self.mesh.stop()
        for name, code in codes.items():
            say(f"  {name:<32} exit {code}")
        if any(code != 0 for name, code in codes.items() if name.endswith("sidecar")):
            self.problems.append("a sidecar did not exit 0 on SIGTERM")

    # ---- 9. audit

    async def audit(self) -> None:
        assert self.mesh is not None
        heading("11. The audit trail: one hash-chained line per call decision, per sidecar")
        say(
            "No bodies, query strings, tokens or identifiers: path segments that could be",
            "identifiers are {id}. Each line says whether the call was mTLS and the peer's",
            "SPIFFE ID. A few lines each, then `sidecar audit verify`:",
        )
        for service in SERVICES:
            path = self.mesh.audit_path(service)
            records = narration.audit_records(path)
            say("", f"{service}: {len(records)} records in {path}")
            for record in narration.sample(records):
                say("  " + narration.audit_line(record, service))
            code, output = await _verify(path)
            say(f"  $ sidecar audit verify {path.name}", f"  {output}", f"  exit {code}")
            if code != 0:
                self.problems.append(f"{service}'s audit chain did not verify")


# ---- helpers


class _Load:
    """Encounters from the edge, ROTATION_WORKERS at a time, until `stop` (or the bounds)."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.stop = asyncio.Event()
        self.encounters = 0
        self.calls = 0
        self.failed = 0

    async def run(self) -> None:
        ends = time.monotonic() + ROTATION_WITHIN
        async def worker() -> None:
            while (not self.stop.is_set() and time.monotonic() < ends
                   and self.encounters < ROTATION_AT_MOST):
                self.encounters += 1
                reply = await self.demo._encounter("TEST-PATIENT-001")
                tree = reply.summary()
                self.calls += narration.hops(tree)
                self.failed += narration.failed_calls(tree)

        await asyncio.gather(*(worker() for _ in range(ROTATION_WORKERS)))


def _not_after(cert: Path) -> str:
    return next((line.split(": ", 1)[1] for line in certs.describe(cert)
                 if line.startswith("not after:")), "?")[:10]


async def _verify(path: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "audit",
        "verify",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return int(process.returncode or 0), out.decode(errors="replace").strip()


def _shipped_breaker() -> Mapping[str, Any]:
    doc = yaml.safe_load((CONFIG_DIR / "healthcare-api.yaml").read_text())
    return dict(doc.get("defaults", {}).get("circuit_breaker") or {})


# ---- running it


def _workdir() -> Path:
    given = os.environ.get("DEMO_WORKDIR")
    if not given:  # kept afterwards, so the logs and audit files can be read
        return Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    return path


async def run(demo: Demo) -> None:
    await demo.start()
    encounters = await demo.encounters()
    await demo.traces(encounters)
    await demo.refusals()
    await demo.rollback()
    await demo.crash()
    held = await demo.compliance_away()
    await demo.compliance_back(held)
    await demo.rotation()
    await demo.stop()
    await demo.audit()


async def amain(demo: Demo) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # clean up as for Ctrl-C
    started = time.monotonic()
    try:
        async with demo.stack, asyncio.timeout(TIME_LIMIT):
            try:
                await run(demo)
            finally:
                if demo.mesh is not None:
                    demo.mesh.kill()  # anything still running after an error
    except TimeoutError:
        demo.problems.append(f"the demo did not finish within {TIME_LIMIT:.0f} s")
    except (ProcessError, netns.NetnsError) as exc:
        demo.problems.append(str(exc))
    finally:
        if demo.layout is not None:
            netns.destroy(demo.layout)
    heading("Done")
    say(f"Took {time.monotonic() - started:.1f} s. Files kept in {demo.workdir}.")
    if demo.problems:
        say("Not everything went as described:", *(f"  - {p}" for p in demo.problems))
        return 1
    say("Everything above happened as described. Next: README.md, deploy/README.md.")
    return 0


def main() -> None:
    mode, why = choose_mode(os.environ.get("DEMO_MODE", "auto").strip().lower())
    if mode == "error":
        print(f"demo: {why}", file=sys.stderr)
        sys.exit(2)
    heading("The sidecar mesh demo")
    say(f"Mode: {mode} ({why}).")
    external = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
    demo = Demo(mode=mode, workdir=_workdir(), external_traces=external)
    try:
        code = asyncio.run(amain(demo))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM
        print("\ninterrupted: everything stopped and removed", file=sys.stderr)
        code = 130
    finally:
        # The last resort, should clean-up itself have been interrupted.
        if demo.mesh is not None:
            demo.mesh.kill()
        if demo.layout is not None:
            netns.destroy(demo.layout)
    sys.exit(code)


if __name__ == "__main__":
    main()
