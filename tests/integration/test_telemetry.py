"""Traces and metrics of two real sidecar processes, as a collector and a scraper see them.

Spans go over OTLP/HTTP to `OtlpReceiver` on the test's loop; each test
stops the sidecars (SIGTERM flushes the export queue) before it reads them,
so the spans it checks are all the spans there will be.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from deploy.process import SidecarProcess, free_port
from tests.support.mesh import Mesh
from tests.support.otlp import OtlpReceiver, SpanDict
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(60)

POLICY = [{"from": ["a"], "methods": ["GET", "POST"], "paths": ["/claims", "/claims/*"]}]
# SPEC "Tracing": the only attribute keys a span may carry. Written out here,
# not imported, so the test checks the code against the contract.
SPEC_ATTRIBUTES = {
    "http.request.method",
    "http.response.status_code",
    "http.route",
    "url.path",
    "url.scheme",
    "server.address",
    "server.port",
    "http.request.resend_count",
    "error.type",
    "network.protocol.version",
    "peer.service",
    "sidecar.source",
    "sidecar.target",
    "sidecar.reason",
}
# Export every 100 ms rather than every second; the rest is flushed at SIGTERM.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
FAST_RETRY = {"attempts": 3, "backoff": {"base": "1ms", "max": "5ms"}}


def otlp(endpoint: str) -> dict[str, str]:
    return {"exporter": "otlp", "endpoint": endpoint}


async def traced_pair(
    make_mesh: Callable[..., Mesh],
    upstreams: Callable[..., Upstream],
    *,
    endpoint: str | None,
    retry: dict[str, Any] | None = None,
    routes: list[str] | None = None,
    a_env: dict[str, str] | None = None,
) -> tuple[SidecarProcess, SidecarProcess, Upstream]:
    """a (outbound) -> b (inbound, POLICY) -> app; both export to `endpoint` unless None."""
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams().start()
    tracing = otlp(endpoint) if endpoint is not None else {"exporter": "none"}
    b = mesh.sidecar(
        "b", drain_timeout="1s", tracing=tracing, inbound={"app": app_b.url, "policy": POLICY}
    )
    b.env.update(FAST_EXPORT)
    await b.start()
    service: dict[str, Any] = {"endpoints": [b.inbound_url], "retry": retry or {"attempts": 1}}
    if routes is not None:
        service["routes"] = routes
    a = mesh.sidecar("a", drain_timeout="1s", tracing=tracing, services={"b": service})
    a.env.update(FAST_EXPORT)
    a.env.update(a_env or {})
    await a.start()
    return a, b, app_b


async def stop_all(*processes: SidecarProcess) -> None:
    """SIGTERM each in turn (the caller first); a clean exit has flushed its spans."""
    for process in processes:
        await process.stop()
        assert process.proc is not None and process.proc.returncode == 0, process.logs()


def of(spans: list[SpanDict], service: str, kind: str) -> list[SpanDict]:
    return [s for s in spans if s["service_name"] == service and s["kind"] == kind]


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    """The status of one call, its body read to the end so the connection is reused."""
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        return response.status


# ---- traces


async def test_client_and_server_spans_share_one_trace_with_parent_links(make_mesh, upstreams):
    async with OtlpReceiver() as receiver:
        a, b, app_b = await traced_pair(make_mesh, upstreams, endpoint=receiver.url)
        app_trace, app_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        async with aiohttp.ClientSession() as session:
            # No context from the app: A's CLIENT span starts the trace.
            baggage = {"baggage": "patient=MRN12345678"}
            assert (
                await fetch(session, "GET", a.outbound_url + "/b/claims/1", headers=baggage) == 200
            )
            # The app's own context: A's CLIENT span is its child.
            headers = {"traceparent": f"00-{app_trace}-{app_span}-01", **baggage}
            assert (
                await fetch(session, "GET", a.outbound_url + "/b/claims/2", headers=headers) == 200
            )
        await stop_all(a, b)
        spans = receiver.spans

    clients, servers = of(spans, "a", "CLIENT"), of(spans, "b", "SERVER")
    assert len(spans) == 4 and len(clients) == 2 and len(servers) == 2, spans
    fresh, continued = clients
    assert fresh["parent_span_id"] == ""
    assert fresh["trace_id"] != app_trace
    assert continued["trace_id"] == app_trace
    assert continued["parent_span_id"] == app_span
    for client, server, seen in zip(clients, servers, app_b.seen, strict=True):
        assert server["trace_id"] == client["trace_id"]
        assert server["parent_span_id"] == client["span_id"]
        # The app continues B's SERVER span, not A's or its caller's.
        version, trace_id, parent_id, flags = seen.headers["traceparent"].split("-")
        assert (version, trace_id, parent_id) == ("00", server["trace_id"], server["span_id"])
        assert int(flags, 16) & 1  # sampled
        assert "baggage" not in seen.headers
        assert client["attributes"]["peer.service"] == "b"
        assert server["attributes"]["sidecar.source"] == "a"
        assert server["attributes"]["peer.service"] == "a"
        assert server["attributes"]["sidecar.target"] == "b"
    assert [s["name"] for s in spans if s["kind"] == "CLIENT"] == ["GET /claims/{id}"] * 2


async def test_a_retried_call_has_one_client_span_per_attempt(make_mesh, upstreams):
    async with OtlpReceiver() as receiver:
        a, b, app_b = await traced_pair(
            make_mesh, upstreams, endpoint=receiver.url, retry=FAST_RETRY
        )
        answers = iter([503, 200])

        async def flaky(request: web.Request) -> web.StreamResponse:
            return web.json_response({}, status=next(answers))

        app_b.script = flaky
        app_trace, app_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        async with aiohttp.ClientSession() as session:
            async with session.get(
                a.outbound_url + "/b/claims/7",
                headers={"traceparent": f"00-{app_trace}-{app_span}-01"},
            ) as response:
                assert response.status == 200
                assert response.headers["x-sidecar-attempts"] == "2"
                await response.read()
        await stop_all(a, b)
        spans = receiver.spans

    clients, servers = of(spans, "a", "CLIENT"), of(spans, "b", "SERVER")
    assert len(clients) == 2 and len(servers) == 2, spans
    first, second = clients
    assert "http.request.resend_count" not in first["attributes"]
    assert second["attributes"]["http.request.resend_count"] == 1
    assert first["attributes"]["http.response.status_code"] == 503
    assert second["attributes"]["http.response.status_code"] == 200
    assert first["status"] == "ERROR" and second["status"] != "ERROR"
    # Both attempts are children of the app's span, in the app's trace.
    assert {(c["trace_id"], c["parent_span_id"]) for c in clients} == {(app_trace, app_span)}
    assert first["span_id"] != second["span_id"]
    assert sorted(s["parent_span_id"] for s in servers) == sorted(c["span_id"] for c in clients)
    # Each app request carries the SERVER span of its own attempt.
    parents = {seen.headers["traceparent"].split("-")[2] for seen in app_b.seen}
    assert parents == {s["span_id"] for s in servers}


async def test_span_names_and_attributes_are_spec_only_and_templated(make_mesh, upstreams):
    async with OtlpReceiver() as receiver:
        a, b, _app_b = await traced_pair(
            make_mesh,
            upstreams,
            endpoint=receiver.url,
            routes=["/patients/{patient}/coverage"],
        )
        async with aiohttp.ClientSession() as session:
            calls = [
                ("GET", "/b/claims/12345", 200),
                ("POST", "/b/claims/12345/lines?patient=12345", 200),
                ("DELETE", "/b/claims/12345", 403),
                ("GET", "/b/patients/12345/coverage", 403),
                ("GET", "/nowhere/12345", 404),
            ]
            for method, path, status in calls:
                body = b"12345" if method == "POST" else None
                assert await fetch(session, method, a.outbound_url + path, data=body) == status
        await stop_all(a, b)
        spans = receiver.spans

    assert Counter((s["service_name"], s["name"]) for s in spans) == {
        ("a", "GET /claims/{id}"): 1,
        ("a", "POST /claims/{id}/lines"): 1,
        ("a", "DELETE /claims/{id}"): 1,
        ("a", "GET /patients/{patient}/coverage"): 1,
        ("b", "GET /claims/{id}"): 1,
        ("b", "POST /claims/{id}/lines"): 1,
        ("b", "DELETE /claims/{id}"): 1,
        ("b", "GET /patients/{id}/coverage"): 1,
    }
    for span in spans:
        attributes = span["attributes"]
        assert set(attributes) <= SPEC_ATTRIBUTES, span
        method, route = span["name"].split(" ", 1)
        assert attributes["http.request.method"] == method
        assert attributes["http.route"] == route and attributes["url.path"] == route
        assert "12345" not in span["name"] + json.dumps(attributes), span
    denied = [s for s in spans if s["attributes"].get("http.response.status_code") == 403]
    assert len(denied) == 4
    assert {s["attributes"].get("sidecar.reason") for s in denied} == {"policy_denied"}


async def test_service_name_is_the_config_service_unless_otel_service_name(make_mesh, upstreams):
    async with OtlpReceiver() as receiver:
        # A takes both its collector and its name from the standard variables.
        a, b, _app_b = await traced_pair(
            make_mesh,
            upstreams,
            endpoint=receiver.url,
            a_env={"OTEL_SERVICE_NAME": "billing-engine"},
        )
        async with aiohttp.ClientSession() as session:
            assert await fetch(session, "GET", a.outbound_url + "/b/claims/1") == 200
        await stop_all(a, b)
        spans = receiver.spans
    assert sorted((s["service_name"], s["kind"]) for s in spans) == [
        ("b", "SERVER"),
        ("billing-engine", "CLIENT"),
    ]


async def test_otel_exporter_otlp_endpoint_turns_export_on(make_mesh, upstreams):
    async with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        a, b, _app_b = await traced_pair(make_mesh, upstreams, endpoint=None, a_env=env)
        async with aiohttp.ClientSession() as session:
            assert await fetch(session, "GET", a.outbound_url + "/b/claims/1") == 200
        await stop_all(a, b)
        spans = receiver.spans
    # B's config says `none` and its environment says nothing: only A exports.
    assert [(s["service_name"], s["kind"]) for s in spans] == [("a", "CLIENT")]


@pytest.mark.parametrize("collector", ["hang", "fail", "absent"])
async def test_a_broken_collector_changes_no_outcome(make_mesh, upstreams, collector):
    mode = "ok" if collector == "absent" else collector
    async with OtlpReceiver(mode=mode) as receiver:
        endpoint = f"http://127.0.0.1:{free_port()}" if collector == "absent" else receiver.url
        # A queue of two spans, exported one at a time: drops come quickly.
        small = {"OTEL_BSP_MAX_QUEUE_SIZE": "2", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"}
        a, b, app_b = await traced_pair(make_mesh, upstreams, endpoint=endpoint, a_env=small)
        statuses = []
        async with aiohttp.ClientSession() as session:
            for i in range(12):
                statuses.append(await fetch(session, "GET", a.outbound_url + f"/b/claims/{i}"))
        assert statuses == [200] * 12
        assert len(app_b.seen) == 12
        await stop_all(a, b)
        assert receiver.spans == []
    drops = [
        line
        for line in json_lines(a.stdout_path.read_text())
        if line["msg"] == "trace spans dropped"
    ]
    assert drops and all(line["dropped"] > 0 for line in drops), a.logs()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---- metrics


async def scrape(session: aiohttp.ClientSession, process: SidecarProcess) -> dict[str, Any]:
    async with session.get(process.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def counts(family: Any, sample_name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels[name] for name in labels): s.value
        for s in family.samples
        if s.name == sample_name and s.value
    }


async def test_metrics_count_the_calls_made(make_mesh, upstreams):
    a, b, app_b = await traced_pair(make_mesh, upstreams, endpoint=None, retry=FAST_RETRY)
    failed_once: set[str] = set()

    async def flaky_once(request: web.Request) -> web.StreamResponse:
        if request.path == "/claims/9" and request.path not in failed_once:
            failed_once.add(request.path)
            return web.json_response({}, status=503)
        return web.json_response({})

    app_b.script = flaky_once
    calls = [
        ("GET", "/b/claims/1", 200),
        ("GET", "/b/claims/2", 200),
        ("GET", "/b/claims/3", 200),
        ("POST", "/b/claims/4", 200),
        ("DELETE", "/b/claims/5", 403),  # policy_denied, by b
        ("GET", "/nowhere/6", 404),  # no_route, by a
        ("GET", "/b/claims/9", 200),  # 503, retried, 200
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, status in calls:
            assert await fetch(session, method, a.outbound_url + path) == status, path
        scraped = {"a": await scrape(session, a), "b": await scrape(session, b)}

    labels = ("direction", "peer", "method", "code", "reason")
    assert counts(scraped["a"]["sidecar_requests"], "sidecar_requests_total", labels) == {
        ("outbound", "b", "GET", "200", ""): 4,
        ("outbound", "b", "POST", "200", ""): 1,
        ("outbound", "b", "DELETE", "403", "policy_denied"): 1,
        ("outbound", "unknown", "GET", "404", "no_route"): 1,
    }
    assert counts(scraped["b"]["sidecar_requests"], "sidecar_requests_total", labels) == {
        ("inbound", "a", "GET", "200", ""): 4,
        ("inbound", "a", "GET", "503", ""): 1,
        ("inbound", "a", "POST", "200", ""): 1,
        ("inbound", "a", "DELETE", "403", "policy_denied"): 1,
    }
    pair = ("direction", "peer")
    histogram = "sidecar_request_duration_seconds"
    assert counts(scraped["a"][histogram], histogram + "_count", pair) == {
        ("outbound", "b"): 6,
        ("outbound", "unknown"): 1,
    }
    assert counts(scraped["b"][histogram], histogram + "_count", pair) == {("inbound", "a"): 7}
    # The +Inf bucket holds every observation, as the count does.
    infinite = {
        (s.labels["direction"], s.labels["peer"]): s.value
        for s in scraped["a"][histogram].samples
        if s.name == histogram + "_bucket" and s.labels["le"] == "+Inf"
    }
    assert infinite == {("outbound", "b"): 6, ("outbound", "unknown"): 1}
    assert counts(scraped["a"]["sidecar_retries"], "sidecar_retries_total", ("peer",)) == {
        ("b",): 1
    }
    assert counts(scraped["b"]["sidecar_retries"], "sidecar_retries_total", ("peer",)) == {}
    circuit = {
        (s.labels["peer"], s.labels["state"]): s.value
        for s in scraped["a"]["sidecar_circuit_state"].samples
    }
    assert circuit == {("b", "closed"): 1, ("b", "open"): 0, ("b", "half-open"): 0}
    for name in ("a", "b"):
        in_flight = scraped[name]["sidecar_in_flight"]
        assert in_flight.type == "gauge" and in_flight.samples
        assert {s.value for s in in_flight.samples} == {0}  # every call has been answered
    assert {tuple(s.labels.values()) for s in scraped["a"]["sidecar_in_flight"].samples} == {
        ("outbound", "b")
    }
    assert {tuple(s.labels.values()) for s in scraped["b"]["sidecar_in_flight"].samples} == {
        ("inbound", "a")
    }
    expected_labels = {
        "sidecar_requests": set(labels),
        histogram: {"direction", "peer", "le"},
        "sidecar_retries": {"peer"},
        "sidecar_circuit_state": {"peer", "state"},
        "sidecar_in_flight": {"direction", "peer"},
        "sidecar_outlier_ejections": {"peer"},
        "sidecar_certificate_expiry_seconds": {"kind"},  # no series with TLS off
    }
    for families in scraped.values():
        ours = {name for name in families if name.startswith("sidecar_")}
        assert ours == set(expected_labels)
        for name in ours:
            for sample in families[name].samples:
                keys = set(sample.labels)
                assert keys == expected_labels[name] or keys == expected_labels[name] - {"le"}
                assert not any(
                    "/" in value or "claims" in value for value in sample.labels.values()
                )
        assert "process_resident_memory_bytes" in {
            s.name for family in families.values() for s in family.samples
        }
