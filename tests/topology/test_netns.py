"""The Compose topology, reproduced with network namespaces and run for real.

One namespace per service (`deploy.netns`): its app on 127.0.0.1:8000 and its
sidecar on 15001/15006/15000, configs from deploy/config with only key, audit
and breaker settings rewritten, names from /etc/netns/<ns>/hosts, a bridge in
a switch namespace, addresses from 198.18.0.0/24. `jaeger` is the switch,
relayed to a real OTLP receiver on this process's loopback. The mesh starts
once for the module; the test that stops an app runs last and restarts it.

Needs root and a working `ip netns`; elsewhere the module is skipped with the
reason (shown by `-ra`).
"""

from __future__ import annotations

import asyncio
import errno
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio

from deploy import netns
from deploy.apps.client import post_encounter
from deploy.apps.common import AppSettings, Neighbours, Reply
from deploy.mesh import LocalMesh, netns_placement
from deploy.topology import APPS, EDGE, SERVICES
from tests.support.otlp import OtlpReceiver

REASON = netns.unavailable_reason()
if REASON is not None:
    pytest.skip(f"network namespaces unavailable: {REASON}", allow_module_level=True)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

BREAKER = {"failure_threshold": 2, "recovery_timeout": "1s"}
FAILING = "compliance-monitor"
REPORTERS = ("insurance-verification", "billing-engine")
# Who calls whom in an encounter: each app must see exactly this caller.
CALLER_OF = {
    "healthcare-api": EDGE,
    "insurance-verification": "healthcare-api",
    "billing-engine": "healthcare-api",
}


@dataclass
class Topology:
    layout: netns.Layout
    mesh: LocalMesh
    receiver: OtlpReceiver

    async def encounter(
        self, patient: str = "TEST-PATIENT-001", headers: Mapping[str, str] | None = None
    ) -> Reply:
        """One encounter, sent from inside the edge namespace through the edge sidecar."""
        async with self.mesh.session(EDGE) as session:
            edge = Neighbours(session, AppSettings(outbound=self.mesh.sites[EDGE].outbound_url))
            return await post_encounter(edge, patient, context=dict(headers or {}))


@pytest.fixture(scope="module")
def layout() -> Iterator[netns.Layout]:
    """The namespaces; removed after the module whatever happened (a plain sync finalizer)."""
    netns.sweep_stale()
    planned = netns.plan(list(SERVICES))
    with netns.built(planned):
        yield planned
    assert netns.namespaces_of(planned.run_id) == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def topology(
    layout: netns.Layout, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Topology]:
    mesh = LocalMesh(
        netns_placement(layout),
        tmp_path_factory.mktemp("netns-mesh"),
        breaker=BREAKER,
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    receiver = OtlpReceiver()
    relay = None
    try:
        await receiver.start()
        port = urlsplit(receiver.url).port
        assert port is not None
        switch = netns.listener_in(layout.switch, str(netns.SWITCH_ADDRESS), netns.TRACES_PORT)
        relay = await netns.Relay(switch, ("127.0.0.1", port)).start()
        await mesh.prepare()
        await mesh.start()
        yield Topology(layout=layout, mesh=mesh, receiver=receiver)
    finally:
        try:
            await mesh.stop()
        finally:
            mesh.kill()  # process groups, should a graceful stop have failed
            if relay is not None:
                await relay.stop()
            await receiver.stop()


def hops(caller: str, node: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(caller, node) for every call in an encounter's call tree."""
    yield caller, node
    for child in node.get("calls") or []:
        yield from hops(str(node["service"]), child)


async def test_the_encounter_workflow_succeeds_end_to_end(topology: Topology) -> None:
    reply = await topology.encounter("TEST-PATIENT-001")

    assert reply.status == 201, reply.body
    assert reply.field("claim")["claim_id"].startswith("CLM-")
    called = [
        (caller, node["service"], node["status"]) for caller, node in hops(EDGE, reply.summary())
    ]
    assert called == [
        (EDGE, "healthcare-api", 201),
        ("healthcare-api", "insurance-verification", 201),
        ("insurance-verification", "compliance-monitor", 202),  # taken by its fan-out
        ("healthcare-api", "billing-engine", 201),
        ("billing-engine", "compliance-monitor", 202),
    ]
    assert reply.field("saga")["state"] == "completed"


async def test_each_app_sees_the_verified_caller_not_what_a_caller_claims(
    topology: Topology,
) -> None:
    # The edge's client claims to be billing-engine; the sidecars decide who it is.
    reply = await topology.encounter(
        "TEST-PATIENT-002", headers={"x-source-service": "billing-engine"}
    )

    assert reply.status == 201, reply.body
    for caller, node in hops(EDGE, reply.summary()):
        if not node.get("via"):  # a fan-out node is its caller's own sidecar's answer
            assert node["source_service"] == caller, (caller, node)
    reported: set[str] = set()
    for _ in range(100):  # the fan-outs deliver a moment after the answer
        async with topology.mesh.session(EDGE) as session:
            edge = Neighbours(
                session, AppSettings(outbound=topology.mesh.sites[EDGE].outbound_url))
            trail = await edge.call(FAILING, "GET", "/events", context={})
        assert trail.status == 200
        assert trail.field("source_service") == EDGE
        reported = {
            event["reported_by"]
            for event in trail.field("events")
            if event["trace_id"] == reply.field("trace_id")
        }
        if reported == set(REPORTERS):
            break
        await asyncio.sleep(0.1)
    assert reported == set(REPORTERS)


async def test_an_app_is_reachable_from_other_namespaces_only_through_its_sidecar(
    topology: Topology,
) -> None:
    mesh = topology.mesh
    ring = mesh.certs
    # A member of the mesh by certificate (the edge's), but without a sidecar's token.
    member = ssl.create_default_context(cafile=str(ring.ca_file))
    member.load_cert_chain(str(ring.cert_file(EDGE)), str(ring.key_file(EDGE)))
    for service in APPS:
        site = mesh.sites[service]
        tls_url = f"https://{site.address}:{site.inbound_port}"
        async with mesh.session(service) as inside:  # the app is up, in its own namespace
            async with inside.get(site.app_url + "/health") as response:
                assert response.status == 200
        async with mesh.session(EDGE) as outside:
            for port in (site.app_port, site.outbound_port, site.admin_port):
                with pytest.raises(aiohttp.ClientConnectorError) as refused:
                    await outside.get(f"http://{site.address}:{port}/health")
                assert refused.value.os_error.errno == errno.ECONNREFUSED, (service, port)
            # The inbound port speaks mutual TLS only (strict), even on a public path.
            async with outside.get(site.inbound_url + "/health") as response:
                assert response.status == 400
                assert response.headers["x-sidecar-reason"] == "tls_required"
            async with outside.get(tls_url + "/health", ssl=member,
                                   server_hostname=service) as response:
                assert response.status == 200  # a public path: the sidecar passes it on
            # Anything else needs a token, which only a sidecar adds.
            async with outside.post(tls_url + "/encounters", json={}, ssl=member,
                                    server_hostname=service) as response:
                assert response.status == 401
                assert response.headers["x-sidecar-reason"] == "token_missing"


async def test_names_resolve_through_the_namespace_hosts_file(topology: Topology) -> None:
    namespace = topology.layout.namespaces["healthcare-api"]
    names = [*SERVICES, netns.TRACES_NAME]
    script = "import socket, sys; print(' '.join(socket.gethostbyname(n) for n in sys.argv[1:]))"
    done = subprocess.run(
        [*netns.exec_prefix(namespace), sys.executable, "-c", script, *names],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    expected = [topology.layout.addresses[name] for name in SERVICES] + [str(netns.SWITCH_ADDRESS)]
    assert done.stdout.split() == expected


async def test_traces_from_every_sidecar_share_the_workflow_trace_id(topology: Topology) -> None:
    reply = await topology.encounter("TEST-PATIENT-001")
    trace_id = reply.field("trace_id")
    assert reply.status == 201 and re.fullmatch("[0-9a-f]{32}", trace_id)

    def complete(spans: list[dict[str, Any]]) -> bool:
        mine = [span for span in spans if span["trace_id"] == trace_id]
        # edge + healthcare-api, 3 saga steps and 2 deliveries of 3 spans each
        return len(mine) >= 17 and {span["service_name"] for span in mine} == set(SERVICES)

    spans = [
        span
        for span in await topology.receiver.wait_for_async(complete, within=15)
        if span["trace_id"] == trace_id
    ]
    servers = {span["service_name"] for span in spans if span["kind"] == "SERVER"}
    assert servers == set(APPS)  # each of the four app sidecars took its call in this trace
    clients = {span["service_name"] for span in spans if span["kind"] == "CLIENT"}
    assert clients == {EDGE, "healthcare-api", *REPORTERS}
    # One tree: a single root (the edge's client span), every other parent in the trace.
    ids = {span["span_id"] for span in spans}
    roots = [span for span in spans if span["parent_span_id"] not in ids]
    assert [(root["service_name"], root["kind"]) for root in roots] == [(EDGE, "CLIENT")]


async def test_stopping_an_app_opens_its_callers_breakers_and_starting_it_closes_them(
    topology: Topology,
) -> None:
    mesh = topology.mesh
    assert [await mesh.breaker_state(caller, FAILING) for caller in REPORTERS] == ["closed"] * 2
    assert await mesh.stop_app(FAILING) == 0
    try:
        states: list[str] = []
        held = await topology.encounter()
        assert held.status == 201  # the events wait in the reporters' fan-outs
        for _ in range(100):  # the deliveries fail, retried: two failures open each breaker
            states = [await mesh.breaker_state(caller, FAILING) for caller in REPORTERS]
            if states == ["open", "open"]:
                break
            await asyncio.sleep(0.1)
        assert states == ["open", "open"]
        assert await mesh.breaker_state("healthcare-api", "billing-engine") == "closed"
        _, metrics = await mesh.admin(REPORTERS[0], "/metrics")
        assert f'sidecar_circuit_state{{peer="{FAILING}",state="open"}} 1.0' in metrics
    finally:
        if not mesh.apps[FAILING].running:
            mesh.start_app(FAILING)
    await mesh.wait_ready(FAILING)

    deadline = 15  # encounters, 0.3 s apart: the breakers probe after 1 s
    for _ in range(deadline * 3):
        await topology.encounter()
        states = [await mesh.breaker_state(caller, FAILING) for caller in REPORTERS]
        if states == ["closed", "closed"]:
            break
        await asyncio.sleep(0.3)
    assert states == ["closed", "closed"]
    # What was held while compliance-monitor was away arrives after all.
    kept: set[str] = set()
    for _ in range(100):
        async with mesh.session(EDGE) as session:
            edge = Neighbours(session, AppSettings(outbound=mesh.sites[EDGE].outbound_url))
            trail = await edge.call(FAILING, "GET", "/events", context={})
        kept = {event["kind"] for event in trail.field("events") or []
                if event.get("encounter_id") == held.field("encounter_id")}
        if len(kept) == 2:
            break
        await asyncio.sleep(0.1)
    assert kept == {"coverage-verified", "claim-submitted"}


async def test_nothing_of_the_run_is_in_the_host_namespace(topology: Topology) -> None:
    """Both ends of every veth pair live in the run's namespaces, none in the host's."""
    run_id = topology.layout.run_id
    host = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert run_id not in host.stdout  # a veth end here would name its peer's namespace
    switch = subprocess.run(
        ["ip", "-n", topology.layout.switch, "-o", "link"],
        capture_output=True,
        text=True,
        check=True,
    )
    for namespace in topology.layout.namespaces.values():
        assert f"link-netns {namespace}" in switch.stdout


async def test_a_failing_block_still_removes_its_namespaces_and_hosts_files() -> None:
    layout = netns.plan(["svc-a", "svc-b"])
    with pytest.raises(RuntimeError, match="the body failed"), netns.built(layout):
        assert netns.namespaces_of(layout.run_id) == sorted(layout.all_namespaces)
        raise RuntimeError("the body failed")
    assert netns.namespaces_of(layout.run_id) == []
    assert not [ns for ns in layout.all_namespaces if (netns.ETC_NETNS / ns).exists()]


async def inside(namespace: str, pid: int, within: float = 10.0) -> None:
    """Until `ip netns pids` lists `pid` in `namespace`."""
    async with asyncio.timeout(within):
        while True:
            listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                    text=True, timeout=within, check=False).stdout.split()
            if str(pid) in listed:
                return
            await asyncio.sleep(0.05)


async def test_a_sweep_removes_what_a_killed_run_left_with_its_processes() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    layout = netns.plan(["svc-a"], run_id=f"{netns.PREFIX}-{int(gone.stdout)}-0ddba11")
    netns.build(layout)
    stray = subprocess.Popen(
        [*netns.exec_prefix(layout.namespaces["svc-a"]), sys.executable, "-c",
         "import time; time.sleep(60)"],
        start_new_session=True,
    )  # fmt: skip
    try:
        # `ip netns exec` enters the namespace only once it runs: a sweep before
        # that would find nobody there to kill.
        await inside(layout.namespaces["svc-a"], stray.pid)
        assert set(layout.all_namespaces) <= set(netns.sweep_stale())
        assert netns.namespaces_of(layout.run_id) == []
        assert stray.wait(10) == -9  # killed with its namespace
    finally:
        stray.kill()
        netns.destroy(layout)
