"""The admin port's Prometheus metrics (SPEC "Admin port")."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.clock import FakeClock
from sidecar.config.settings import BreakerPolicy
from sidecar.http import guards, problem
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.classify import Outcome
from sidecar.stack import Call, Direction, Handler, Reply, UpstreamError, compose
from sidecar.telemetry.metrics import Metrics, observe, track_in_flight
from tests.support.calls import Next, ok
from tests.support.calls import make_call as support_call

FAMILIES = {
    "sidecar_requests": ("counter", {"direction", "peer", "method", "code", "reason"}),
    "sidecar_request_duration_seconds": ("histogram", {"direction", "peer"}),
    "sidecar_retries": ("counter", {"peer"}),
    "sidecar_circuit_state": ("gauge", {"peer", "state"}),
    "sidecar_in_flight": ("gauge", {"direction", "peer"}),
    "sidecar_outlier_ejections": ("counter", {"peer"}),
    "sidecar_certificate_expiry_seconds": ("gauge", {"kind"}),
}


def make_call(
    direction: Direction = "outbound",
    *,
    method: str = "GET",
    target: str = "insurance-verification",
    source: str = "billing-engine",
) -> Call:
    """A call with PHI in its path and query and a token, routed to `/patients/{id}`."""
    return support_call(
        "/patients/MRN12345678",
        direction=direction,
        method=method,
        query="ssn=078-05-1120",
        headers={"x-service-token": "secret-token"},
        source=source,
        target_name=target,
        route="/patients/{id}",
    )


def samples(metrics: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples named `name`, parsed back from the text the admin port serves."""
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    found = []
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name:
                found.append((sample.labels, sample.value))
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float:
    matching = [v for found, v in samples(metrics, name) if found == labels]
    assert len(matching) == 1, f"{name}{labels}: {samples(metrics, name)}"
    return matching[0]


def test_exactly_the_spec_families_with_their_labels() -> None:
    metrics = Metrics(peers=["insurance-verification"],
                      certificates=lambda: [("certificate", 86400.0), ("ca", -1.0)])
    metrics.answered("outbound", "insurance-verification", "GET", "200", "", 0.01)
    metrics.retried("insurance-verification")
    metrics.ejected("insurance-verification")
    metrics.in_flight.labels("inbound", "anonymous").set(0)
    text, _ = metrics.render()
    families = {
        f.name: f
        for f in text_string_to_metric_families(text.decode())
        if f.name.startswith("sidecar_")
    }
    assert set(families) == set(FAMILIES)
    for name, (kind, labels) in FAMILIES.items():
        assert families[name].type == kind
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels
    # The process collectors are on the registry too.
    assert any(f.name.startswith("process_") for f in text_string_to_metric_families(text.decode()))


async def test_observe_counts_the_answer_and_its_duration() -> None:
    clock = FakeClock()
    metrics = Metrics(peers=["insurance-verification"])

    async def takes_300ms(call: Call) -> Reply:
        clock.advance(0.3)
        return ok()

    handler = compose(
        observe(metrics=metrics, direction="outbound", clock=clock), terminal=takes_300ms
    )

    await handler(make_call())

    labels = {
        "direction": "outbound",
        "peer": "insurance-verification",
        "method": "GET",
        "code": "200",
        "reason": "",
    }
    assert value(metrics, "sidecar_requests_total", **labels) == 1
    duration = {"direction": "outbound", "peer": "insurance-verification"}
    assert value(metrics, "sidecar_request_duration_seconds_sum", **duration) == pytest.approx(0.3)
    assert value(metrics, "sidecar_request_duration_seconds_bucket", le="0.25", **duration) == 0
    assert value(metrics, "sidecar_request_duration_seconds_bucket", le="0.5", **duration) == 1


async def test_labels_never_carry_raw_values() -> None:
    metrics = Metrics(peers=["insurance-verification"])
    clock = FakeClock()
    relayed = ok(503, reason="Smith, John")
    await compose(
        observe(metrics=metrics, direction="outbound", clock=clock), terminal=Next(relayed)
    )(make_call(method="BREW"))
    refused = problem.reply("no_route", "unknown service")
    await compose(
        observe(metrics=metrics, direction="outbound", clock=clock), terminal=Next(refused)
    )(make_call(target="MRN12345678.evil"))

    assert (
        value(
            metrics,
            "sidecar_requests_total",
            direction="outbound",
            peer="insurance-verification",
            method="OTHER",
            code="503",
            reason="",
        )
        == 1
    )
    assert (
        value(
            metrics,
            "sidecar_requests_total",
            direction="outbound",
            peer="unknown",
            method="GET",
            code="404",
            reason="no_route",
        )
        == 1
    )
    text = metrics.render()[0].decode()
    for raw in ("BREW", "Smith", "MRN12345678", "078-05-1120", "secret-token"):
        assert raw not in text


async def test_inbound_peer_is_the_verified_source_or_anonymous() -> None:
    metrics = Metrics()
    clock = FakeClock()

    async def verify(call: Call, next: Handler) -> Reply:
        call.source = "healthcare-api"  # what the token check sets once it verified the caller
        return await next(call)

    layer = observe(metrics=metrics, direction="inbound", clock=clock)
    await compose(layer, verify, terminal=Next())(
        make_call("inbound", source="anonymous")
    )
    await compose(layer, terminal=Next(problem.reply("token_missing", "no token")))(
        make_call("inbound", source="anonymous")
    )

    assert (
        value(
            metrics,
            "sidecar_requests_total",
            direction="inbound",
            peer="healthcare-api",
            method="GET",
            code="200",
            reason="",
        )
        == 1
    )
    assert (
        value(
            metrics,
            "sidecar_requests_total",
            direction="inbound",
            peer="anonymous",
            method="GET",
            code="401",
            reason="token_missing",
        )
        == 1
    )


async def test_escaped_failures_are_counted_as_their_answer() -> None:
    # Inside the stack nothing reaches metrics as an exception: the failure
    # layer answers upstream failures and the last resort anything else.
    metrics = Metrics(peers=["insurance-verification"])

    timing_out = Next(UpstreamError("timeout", sent=True))
    broken = Next(RuntimeError("a bug"))
    outer = (observe(metrics=metrics, direction="outbound", clock=FakeClock()),
             guards.answer_internal_errors())
    reply = await compose(*outer, guards.answer_failures(who=""), terminal=timing_out)(make_call())
    assert reply.status == 504
    reply = await compose(*outer, terminal=broken)(make_call())
    assert (reply.status, reply.reason) == (500, "internal_error")
    assert value(metrics, "sidecar_requests_total", direction="outbound",
                 peer="insurance-verification", method="GET", code="500",
                 reason="internal_error") == 1
    assert (
        value(
            metrics,
            "sidecar_requests_total",
            direction="outbound",
            peer="insurance-verification",
            method="GET",
            code="504",
            reason="upstream_timeout",
        )
        == 1
    )


async def test_in_flight_rises_and_falls() -> None:
    metrics = Metrics(peers=["insurance-verification"])
    entered, leave = asyncio.Event(), asyncio.Event()

    async def slow(call: Call) -> Reply:
        entered.set()
        await leave.wait()
        return ok()

    handler = compose(track_in_flight(metrics=metrics, direction="outbound"), terminal=slow)
    task = asyncio.ensure_future(handler(make_call()))
    await entered.wait()
    labels = {"direction": "outbound", "peer": "insurance-verification"}
    assert value(metrics, "sidecar_in_flight", **labels) == 1
    leave.set()
    await task
    assert value(metrics, "sidecar_in_flight", **labels) == 0


def test_circuit_state_is_one_for_the_current_state_only() -> None:
    breaker = {"insurance-verification": "closed"}
    metrics = Metrics(peers=["insurance-verification"], circuit_states=breaker.items)
    assert (
        value(metrics, "sidecar_circuit_state", peer="insurance-verification", state="closed") == 1
    )
    breaker["insurance-verification"] = "half-open"  # read at the next scrape
    states = {
        labels["state"]: v
        for labels, v in samples(metrics, "sidecar_circuit_state")
        if labels["peer"] == "insurance-verification"
    }
    assert states == {"closed": 0, "open": 0, "half-open": 1}
    breaker["insurance-verification"] = "tripped"
    with pytest.raises(ValueError):
        metrics.render()


def test_circuit_state_reads_the_breakers_when_scraped(clock: FakeClock) -> None:
    changes: list[tuple[str, str, str]] = []
    policy = BreakerPolicy(failure_threshold=1, recovery_timeout=10)
    breakers = Breakers(
        {"insurance-verification": policy, "compliance-monitor": policy},
        clock,
        on_change=lambda *change: changes.append(change),
    )
    metrics = Metrics(peers=["insurance-verification"], circuit_states=breakers.states)
    assert {labels["peer"] for labels, _ in samples(metrics, "sidecar_circuit_state")} == {
        "insurance-verification",
        "compliance-monitor",
    }
    breaker = breakers.for_service("insurance-verification")
    breaker.record(Outcome.FAILURE)
    assert value(metrics, "sidecar_circuit_state", peer="insurance-verification", state="open") == 1
    clock.advance(10)
    for _ in range(2):
        assert (
            value(
                metrics, "sidecar_circuit_state", peer="insurance-verification", state="half-open"
            )
            == 1
        )
    # Scraping changed nothing: the change is made by the next call the breaker lets through.
    assert changes == [("insurance-verification", "closed", "open")]
    assert breaker.generation == 1


def test_retries_and_ejections_count_per_peer() -> None:
    metrics = Metrics(peers=["compliance-monitor"])
    metrics.retried("compliance-monitor", 2)
    metrics.retried("compliance-monitor")
    metrics.ejected("compliance-monitor")
    assert value(metrics, "sidecar_retries_total", peer="compliance-monitor") == 3
    assert value(metrics, "sidecar_outlier_ejections_total", peer="compliance-monitor") == 1


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(peers=["a"]), Metrics(peers=["a"])
    first.retried("a")
    assert value(first, "sidecar_retries_total", peer="a") == 1
    assert samples(second, "sidecar_retries_total") == []


def test_layers_refuse_an_unknown_direction() -> None:
    with pytest.raises(ValueError):
        observe(metrics=Metrics(), direction="sideways", clock=FakeClock())  # type: ignore[arg-type]
