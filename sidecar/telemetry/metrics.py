"""Prometheus metrics for the admin port's `/metrics` (SPEC "Admin port").

Exactly seven families, on a registry of this process's own (never the
global one), next to the process, platform and GC collectors:

    sidecar_requests_total{direction,peer,method,code,reason}
    sidecar_request_duration_seconds{direction,peer}        histogram
    sidecar_retries_total{peer}
    sidecar_circuit_state{peer,state}                        1 for the current state
    sidecar_in_flight{direction,peer}
    sidecar_outlier_ejections_total{peer}
    sidecar_certificate_expiry_seconds{kind}                 with TLS on: seconds left

With `workflows` configured, `count_workflows` adds three more:

    sidecar_workflow_steps_total{outcome}       done, retried, failed, compensated,
                                                compensation_failed
    sidecar_deliveries_total{peer,outcome}      delivered, retried, dead
    sidecar_dead_letters                        deliveries waiting for a redrive

Every label value comes from a closed set, so nothing a caller sends can
become a label: `method` is a standard method or OTHER, `reason` one of
SPEC's codes or "", `code` a status; `peer` is a configured service (else
"unknown") outbound, and the verified caller (else "anonymous") inbound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from sidecar import reasons
from sidecar.clock import Clock
from sidecar.names import is_service_name
from sidecar.stack import Call, Direction, Handler, Layer, Reply, safe_method

DIRECTIONS = ("outbound", "inbound")
BREAKER_STATES = ("closed", "open", "half-open")
UNKNOWN = "unknown"
ANONYMOUS = "anonymous"
# From a sidecar's own overhead (~1 ms) to the longest sensible call timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

NO_ANSWER = "0"  # the caller went away before any answer was sent
STEP_OUTCOMES = ("done", "retried", "failed", "compensated", "compensation_failed")
DELIVERY_OUTCOMES = ("delivered", "retried", "dead")

# Each configured service with its breaker's state now: (peer, "closed" | "open" | "half-open").
CircuitStates = Callable[[], Iterable[tuple[str, str]]]
# Seconds left before each of this sidecar's certificates expires: (kind, seconds).
Expiries = Callable[[], Iterable[tuple[str, float]]]


def _no_circuits() -> Iterable[tuple[str, str]]:
    return ()


def _no_certificates() -> Iterable[tuple[str, float]]:
    return ()


class Metrics:
    """The seven families on a registry of their own; `peers` are the configured services.

    `circuit_states` is asked at every scrape, so `sidecar_circuit_state` shows
    each breaker as it is then, a recovery timeout that has just passed included.
    """

    def __init__(
        self, *, peers: Iterable[str] = (), circuit_states: CircuitStates = _no_circuits,
        certificates: Expiries = _no_certificates,
    ) -> None:
        # SPEC names exactly seven families; the `*_created` series would add four.
        # prometheus-client only offers this switch process-wide.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "sidecar_requests",
            "Calls answered, by direction, peer, method, status and reason.",
            ["direction", "peer", "method", "code", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time to answer a call, retries included.",
            ["direction", "peer"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "sidecar_retries",
            "Attempts after the first, per target service.",
            ["peer"],
            registry=self.registry,
        )
        self.registry.register(CircuitCollector(circuit_states))
        self.in_flight = Gauge(
            "sidecar_in_flight",
            "Calls being handled now.",
            ["direction", "peer"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "sidecar_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            ["peer"],
            registry=self.registry,
        )
        self.registry.register(ExpiryCollector(certificates))
        self._peers: frozenset[str] = frozenset()
        self._answer_children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._in_flight_children: dict[tuple[str, str], Gauge] = {}
        self.set_peers(peers)

    def set_peers(self, names: Iterable[str]) -> None:
        """The configured services (at start and on reload)."""
        self._peers = frozenset(name.lower() for name in names)

    def peer(self, call: Call) -> str:
        """The `peer` label: the configured target outbound, the verified caller inbound."""
        if call.direction == "outbound":
            target = call.target.lower()
            return target if target in self._peers else UNKNOWN
        source = call.source.lower()
        if source == ANONYMOUS or not is_service_name(source):
            return ANONYMOUS
        return source

    def answered(
        self, direction: Direction, peer: str, method: str, code: str, reason: str, seconds: float
    ) -> None:
        key = (direction, peer, safe_method(method), code, reason)
        children = self._answer_children.get(key)
        if children is None:
            # Label values come from closed sets, so this table stays small;
            # resolving a child is the costly part of a metric update.
            children = (self.requests.labels(*key),
                        self.duration.labels(direction, peer))
            self._answer_children[key] = children
        children[0].inc()
        children[1].observe(max(0.0, seconds))

    def in_flight_gauge(self, direction: Direction, peer: str) -> Gauge:
        """The `sidecar_in_flight` child for one direction and peer (resolved once)."""
        gauge = self._in_flight_children.get((direction, peer))
        if gauge is None:
            gauge = self._in_flight_children[(direction, peer)] = self.in_flight.labels(
                direction, peer)
        return gauge

    def ejected(self, peer: str) -> None:
        self.ejections.labels(peer.lower()).inc()

    def retried(self, peer: str, n: int = 1) -> None:
        if n < 0:
            raise ValueError("a retry count cannot be negative")
        self.retries.labels(peer.lower()).inc(n)

    def count_workflows(self, *, dead_letters: Callable[[], float]) -> None:
        """Add the workflow families; `dead_letters` is read at every scrape."""
        self.workflow_steps = Counter(
            "sidecar_workflow_steps",
            "Saga steps and compensations, by what became of each try.",
            ["outcome"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "sidecar_deliveries",
            "Fan-out deliveries, by target service and what became of each try.",
            ["peer", "outcome"],
            registry=self.registry,
        )
        Gauge("sidecar_dead_letters", "Deliveries that gave up, waiting for a redrive.",
              registry=self.registry).set_function(dead_letters)

    def workflow_step(self, outcome: str) -> None:
        if outcome not in STEP_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(STEP_OUTCOMES)}")
        self.workflow_steps.labels(outcome).inc()

    def delivery(self, peer: str, outcome: str) -> None:
        if outcome not in DELIVERY_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(DELIVERY_OUTCOMES)}")
        peer = peer.lower()
        self.deliveries.labels(peer if peer in self._peers else UNKNOWN, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CircuitCollector(Collector):
    """`sidecar_circuit_state{peer,state}`: 1 for each breaker's current state, 0 for the others.

    Reads the states when scraped rather than keeping gauges in step with
    every change: reading a breaker changes nothing, so a scrape cannot either.
    """

    def __init__(self, states: CircuitStates) -> None:
        self._states = states

    def describe(self) -> Iterable[Metric]:
        # Registering asks for the family's name; the states are read only by `collect`.
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        current = {peer.lower(): state for peer, state in self._states()}
        for peer in sorted(current):
            if current[peer] not in BREAKER_STATES:
                raise ValueError(f"breaker state must be one of {', '.join(BREAKER_STATES)}")
            for state in BREAKER_STATES:
                family.add_metric([peer, state], 1 if state == current[peer] else 0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "sidecar_circuit_state",
            "1 for the breaker's current state, 0 for the others.",
            labels=["peer", "state"],
        )


class ExpiryCollector(Collector):
    """`sidecar_certificate_expiry_seconds{kind}`: seconds until this sidecar's certificate
    (`kind="certificate"`) and the earliest CA of its bundle (`kind="ca"`) expire; negative
    once past. Read when scraped, as the circuit states are; no series with TLS off."""

    def __init__(self, expiries: Expiries) -> None:
        self._expiries = expiries

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for kind, seconds in self._expiries():
            family.add_metric([kind], seconds)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "sidecar_certificate_expiry_seconds",
            "Seconds until the certificate or the earliest mesh CA expires (negative: expired).",
            labels=["kind"],
        )


def observe(*, metrics: Metrics, direction: Direction, clock: Clock) -> Layer:
    """Counts every answer and its duration: `sidecar_requests_total` and the histogram.

    Sits outermost, outside the audit, in both stacks, so refusals (`no_route`,
    `token_invalid`, `circuit_open`, ...) are counted too; labels are read
    when the answer is known, after routing and the token check have named
    the peer. Inner failures arrive as replies (`guards.answer_internal_errors`
    sits inside); a caller that went away is counted with code "0". Refuses
    nothing.
    """
    _check_direction(direction)

    async def observe_layer(call: Call, next: Handler) -> Reply:
        started = clock.monotonic()
        try:
            reply = await next(call)
        except asyncio.CancelledError:
            # The caller went away before any answer: counted with code "0".
            metrics.answered(direction, metrics.peer(call), call.method, NO_ANSWER, "",
                             clock.monotonic() - started)
            raise
        peer = metrics.peer(call)
        metrics.answered(
            direction,
            peer,
            call.method,
            str(reply.status),
            reasons.known(reply.reason) or "",
            clock.monotonic() - started,
        )
        if call.retries:
            metrics.retried(peer, call.retries)
        return reply

    return observe_layer


def track_in_flight(*, metrics: Metrics, direction: Direction) -> Layer:
    """`sidecar_in_flight`: calls in progress, per direction and peer.

    Its own layer because the peer must be known when the call enters: place
    it after routing outbound and after the token check inbound (before that
    every inbound caller is `anonymous`). Refuses nothing.
    """
    _check_direction(direction)

    async def track_in_flight_layer(call: Call, next: Handler) -> Reply:
        gauge = metrics.in_flight_gauge(direction, metrics.peer(call))
        gauge.inc()
        try:
            return await next(call)
        finally:
            gauge.dec()

    return track_in_flight_layer


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")

