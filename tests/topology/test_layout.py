"""The pure parts of the topology, no root needed: plans, commands, configs, env, trace trees."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from deploy import demo, narration, netns, traces
from deploy.mesh import (
    CONFIG_DIR,
    TRUST_DOMAIN,
    adapt_config,
    loopback_placement,
    netns_placement,
)
from deploy.process import CertRing, child_env
from deploy.topology import EDGE, SERVICES
from sidecar import cli
from sidecar.identity import keys

MESH_RANGE = ipaddress.ip_network("198.18.0.0/15")


def shipped(service: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / f"{service}.yaml").read_text())


def test_each_plan_has_its_own_names_and_addresses_in_198_18() -> None:
    first, second = netns.plan(list(SERVICES)), netns.plan(list(SERVICES))

    assert first.run_id != second.run_id
    assert not set(first.all_namespaces) & set(second.all_namespaces)
    addresses = [ipaddress.ip_address(a) for a in first.addresses.values()]
    assert len(set(addresses)) == len(SERVICES)
    assert all(a in MESH_RANGE for a in [*addresses, netns.SWITCH_ADDRESS])
    assert netns.SWITCH_ADDRESS not in addresses


def test_every_command_names_one_of_the_runs_namespaces() -> None:
    layout = netns.plan(list(SERVICES))
    ours = set(layout.all_namespaces)

    for command in netns.commands(layout):
        if command[:3] == ["ip", "netns", "add"]:
            assert command[3] in ours
        else:  # never the host's namespace: each command runs in one of ours
            assert command[:2] == ["ip", "-n"] and command[2] in ours, command
        if "veth" in command:  # made in the switch, its peer placed straight in a service's
            assert command[2] == layout.switch
            assert command[command.index("netns") + 1] in layout.namespaces.values()
    veths = [c for c in netns.commands(layout) if "veth" in c]
    assert len(veths) == len(SERVICES)


def test_the_hosts_file_names_every_service_and_jaeger() -> None:
    layout = netns.plan(list(SERVICES))
    entries = {
        name: address
        for line in netns.hosts_file(layout).splitlines()
        for address, *names in [line.split()]
        for name in names
    }
    assert {s: entries[s] for s in SERVICES} == layout.addresses
    assert entries["jaeger"] == str(netns.SWITCH_ADDRESS)
    assert "127.0.0.1\tlocalhost" in netns.hosts_file(layout).splitlines()


def test_in_a_namespace_only_keys_certificates_audit_store_tracing_and_pace_change() -> None:
    placement = netns_placement(netns.plan(list(SERVICES)))
    ring = CertRing(Path("/c"), trust_domain=TRUST_DOMAIN)
    for service in SERVICES:
        original = shipped(service)
        out = adapt_config(
            original,
            site=placement.sites[service],
            sites=placement.sites,
            private_key=Path("/k/x.pem"),
            jwks=Path("/k/jwks.json"),
            audit=Path("/a/x.jsonl"),
            store=Path("/w/x.db"),
            certs=ring,
            breaker={"failure_threshold": 2},
            redelivery={"max": "1s"},
            ship_interval="500ms",
        )
        assert out["identity"]["private_key_file"] == "/k/x.pem"
        assert out["identity"]["jwks_file"] == "/k/jwks.json"
        assert out["tls"] == ring.tls(service, "strict")  # the mode as shipped
        assert out["audit"] == {"path": "/a/x.jsonl",
                                "ship": {**original["audit"]["ship"], "interval": "500ms"}}
        assert out["workflows"]["store"] == "sqlite:///w/x.db"
        assert out["workflows"]["redelivery"] == {"base": "1s", "max": "1s"}
        assert out["defaults"]["circuit_breaker"]["failure_threshold"] == 2
        assert out["defaults"]["circuit_breaker"]["recovery_timeout"] == "10s"  # kept
        for changed in ("identity", "tls", "audit", "defaults", "workflows"):
            out.pop(changed), original.pop(changed)
        assert out == original  # listen, endpoints, policy, tracing: as in Compose


def test_on_loopback_each_service_gets_its_own_ports_and_peers_are_rewritten() -> None:
    placement = loopback_placement(SERVICES)
    sites = placement.sites
    ports = [
        port
        for site in sites.values()
        for port in (site.app_port, site.outbound_port, site.inbound_port, site.admin_port)
    ]
    assert len(set(ports)) == len(ports)

    site = sites["healthcare-api"]
    out = adapt_config(
        shipped("healthcare-api"),
        site=site,
        sites=sites,
        private_key=Path("k.pem"),
        jwks=Path("j.json"),
        audit=Path("a.jsonl"),
        tracing_endpoint="http://127.0.0.1:4318",
    )
    assert out["listen"] == {
        "outbound": f"127.0.0.1:{site.outbound_port}",
        "inbound": f"127.0.0.1:{site.inbound_port}",
        "admin": f"127.0.0.1:{site.admin_port}",
    }
    assert out["inbound"]["app"] == f"http://127.0.0.1:{site.app_port}"
    assert out["inbound"]["policy"] == shipped("healthcare-api")["inbound"]["policy"]
    assert out["services"]["billing-engine"]["endpoints"] == [
        f"http://127.0.0.1:{sites['billing-engine'].inbound_port}"
    ]
    assert out["tracing"]["endpoint"] == "http://127.0.0.1:4318"


@pytest.mark.parametrize("mode", ["netns", "loopback"])
def test_adapted_configs_pass_sidecar_check(mode: str, tmp_path: Path) -> None:
    placement = (
        netns_placement(netns.plan(list(SERVICES))) if mode == "netns" else loopback_placement()
    )
    for service in SERVICES:
        keys.generate(service=service, out_dir=tmp_path, algorithm="EdDSA")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.merge_jwks([tmp_path])))
    ring = CertRing(tmp_path, trust_domain=TRUST_DOMAIN).generate(SERVICES)
    for service in SERVICES:
        path = tmp_path / f"{service}.yaml"
        doc = adapt_config(
            shipped(service),
            site=placement.sites[service],
            sites=placement.sites,
            private_key=tmp_path / f"{service}.pem",
            jwks=jwks,
            audit=tmp_path / f"{service}.jsonl",
            certs=ring,
            breaker=demo.DEMO_BREAKER,
        )
        path.write_text(yaml.safe_dump(doc))
        assert cli.main(["check", "-c", str(path)]) == 0, service


def test_mesh_processes_inherit_no_proxy_otel_or_upstream_variables() -> None:
    env = child_env(
        {
            "PATH": "/bin",
            "HTTP_PROXY": "http://proxy:3128",
            "https_proxy": "http://proxy:3128",
            "NO_PROXY": "x",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "BILLING_ENGINE_URL": "http://elsewhere:8000",
        },
        {"OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    assert env["PATH"] == "/bin"
    assert env["OTEL_BSP_SCHEDULE_DELAY"] == "100"  # what the caller sets explicitly stays
    for gone in ("HTTP_PROXY", "https_proxy", "NO_PROXY", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        assert gone not in env
    assert "BILLING_ENGINE_URL" not in env


def _span(message: ExportTraceServiceRequest, service: str, **fields: Any) -> None:
    resource_spans = message.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", service
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id = bytes.fromhex("ab" * 16)
    for name, value in fields.items():
        setattr(span, name, value)
    code = span.attributes.add()
    code.key, code.value.int_value = "http.response.status_code", 200


def test_a_trace_prints_as_a_tree_of_spans_in_start_order() -> None:
    message = ExportTraceServiceRequest()
    root, server, late, early = b"\x01" * 8, b"\x02" * 8, b"\x03" * 8, b"\x04" * 8
    _span(
        message,
        EDGE,
        name="POST /encounters",
        span_id=root,
        kind=3,
        start_time_unix_nano=0,
        end_time_unix_nano=9_000_000,
    )
    _span(
        message,
        "healthcare-api",
        name="POST /encounters",
        span_id=server,
        kind=2,
        parent_span_id=root,
        start_time_unix_nano=1,
        end_time_unix_nano=8_000_000,
    )
    _span(
        message,
        "healthcare-api",
        name="POST /claims",
        span_id=late,
        kind=3,
        parent_span_id=server,
        start_time_unix_nano=5,
        end_time_unix_nano=7_000_000,
    )
    _span(message, "healthcare-api", name="GET /patients/{id}/coverage", span_id=early, kind=3,
          parent_span_id=server, start_time_unix_nano=2, end_time_unix_nano=3_500_000)  # fmt: skip

    spans = traces.decode(message.SerializeToString())

    assert traces.tree_lines(spans) == [
        "POST /encounters [edge, client] 9.0 ms -> 200",
        "  POST /encounters [healthcare-api, server] 8.0 ms -> 200",
        "    GET /patients/{id}/coverage [healthcare-api, client] 3.5 ms -> 200",
        "    POST /claims [healthcare-api, client] 7.0 ms -> 200",
    ]
    # A span whose parent never arrived is still shown, as a root.
    assert traces.tree_lines(spans[1:])[0].startswith("POST /encounters [healthcare-api")


ENCOUNTER = {
    "service": "healthcare-api",
    "status": 201,
    "source_service": EDGE,
    "calls": [
        {"service": "insurance-verification", "status": 201,
         "source_service": "healthcare-api",
         "calls": [{"service": "compliance-monitor", "status": 503,
                    "reason": "circuit_open", "source_service": None}]},
        {"service": "billing-engine", "status": 201, "source_service": "healthcare-api",
         "calls": [{"service": "compliance-monitor", "status": 202, "via": "fan-out"}]},
    ],
}  # fmt: skip
SAGA = {"id": "S-1", "state": "completed", "steps": [
    {"name": "verify", "status": "done", "attempts": 1},
    {"name": "claim", "status": "done", "attempts": 2},
    {"name": "notify", "status": "pending", "attempts": 0}]}  # fmt: skip


def test_the_demo_shows_which_caller_each_app_saw() -> None:
    lines = narration.call_lines(EDGE, ENCOUNTER)

    assert [line.split()[:4] for line in lines] == [
        [EDGE, "->", "healthcare-api", "201"],
        ["healthcare-api", "->", "insurance-verification", "201"],
        ["insurance-verification", "->", "compliance-monitor", "503"],
        ["healthcare-api", "->", "billing-engine", "201"],
        ["billing-engine", "->", "compliance-monitor", "202"],
    ]
    assert lines[0].endswith(f"app saw x-source-service: {EDGE}")
    assert "circuit_open" in lines[2] and lines[2].endswith("the app was not reached")
    assert lines[4].endswith("queued by billing-engine's sidecar (fan-out)")
    assert narration.services_in(EDGE, ENCOUNTER) == set(SERVICES)


def test_the_demo_counts_the_spans_of_a_saga_and_checks_every_caller_seen() -> None:
    # edge + healthcare-api, 2 steps sent x 3, 1 fan-out delivery x 3
    assert narration.spans_expected(ENCOUNTER, SAGA) == 2 + 6 + 3
    assert narration.saga_text(SAGA) == "completed (verify done, claim done, notify pending)"
    assert narration.callers_verified(EDGE, ENCOUNTER)
    assert not narration.callers_verified("billing-engine", ENCOUNTER)  # wrong caller seen


def test_the_demo_chooses_loopback_only_when_asked_or_namespaces_fail() -> None:
    assert demo.choose_mode("loopback") == ("loopback", "DEMO_MODE=loopback")
    assert demo.choose_mode("docker")[0] == "error"
    mode, why = demo.choose_mode("auto")
    assert (mode == "netns") == (netns.unavailable_reason() is None), why
