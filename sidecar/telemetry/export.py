"""Where spans go: the export plan from config and OTEL_* variables, a bounded
queue exported by a thread of its own, the drop count, and the process's tracer.

A collector that is down or slow never slows or fails a call: `on_end` never
blocks, and spans that cannot be delivered are dropped, counted and logged.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
)

from sidecar.config import settings
from sidecar.names import EXPORTERS, PROTOCOLS
from sidecar.telemetry.logs import event

DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}
TRACES_PATH = "/v1/traces"
EXPORT_TIMEOUT = 2.0  # seconds; a slow collector holds only the export thread
MAX_QUEUE_SIZE = 2048
MAX_BATCH = 512
SCHEDULE_DELAY = 1.0
DROP_REPORT_EVERY = 10.0  # seconds between log lines about dropped spans

log = logging.getLogger("sidecar.tracing")


# ---- what to export where: config, overridden by the standard OTEL_* variables


@dataclass(frozen=True, slots=True)
class ExportPlan:
    exporter: str  # one of names.EXPORTERS
    protocol: str  # one of names.PROTOCOLS
    endpoint: str  # the full traces URL (http) or the collector address (grpc); "" unless otlp
    service_name: str
    sampler: Sampler
    timeout: float | None  # None: the exporter reads OTEL_EXPORTER_OTLP_*TIMEOUT itself
    max_queue_size: int = MAX_QUEUE_SIZE
    max_batch: int = MAX_BATCH
    delay: float = SCHEDULE_DELAY


def plan_export(cfg: settings.Tracing, *, service_name: str, env: Mapping[str, str]) -> ExportPlan:
    """Merge `cfg` with the OTEL_* variables in `env`, the variables winning.

    As in any OpenTelemetry SDK: OTEL_SDK_DISABLED turns export off (the trace
    context is still kept); an OTLP endpoint in the environment turns OTLP on
    when the config says `none`; OTEL_TRACES_SAMPLER_ARG alone replaces
    `sample_ratio`. A value the SDK would not accept is logged and ignored.
    """
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    exporter = _choose_exporter(cfg.exporter, env)
    protocol = _pick(
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL"),
        PROTOCOLS,
        cfg.protocol,
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    )
    timeout_set = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" in env or "OTEL_EXPORTER_OTLP_TIMEOUT" in env
    return ExportPlan(
        exporter="none" if disabled else exporter,
        protocol=protocol,
        endpoint=_endpoint(cfg, protocol, env) if exporter == "otlp" and not disabled else "",
        service_name=env.get("OTEL_SERVICE_NAME") or service_name,
        sampler=_sampler(cfg.sample_ratio, env),
        timeout=None if timeout_set else EXPORT_TIMEOUT,
        max_queue_size=_positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE_SIZE),
        max_batch=_positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_BATCH),
        delay=_positive(env, "OTEL_BSP_SCHEDULE_DELAY", int(SCHEDULE_DELAY * 1000)) / 1000,
    )


def _choose_exporter(configured: str, env: Mapping[str, str]) -> str:
    named = env.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if named:
        return _pick(named, EXPORTERS, configured, "OTEL_TRACES_EXPORTER")
    endpoint_set = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return "otlp" if configured == "none" and endpoint_set else configured


def _endpoint(cfg: settings.Tracing, protocol: str, env: Mapping[str, str]) -> str:
    signal = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if signal:
        return signal  # a signal endpoint is used exactly as given
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or cfg.endpoint or DEFAULT_ENDPOINTS[protocol]
    return base if protocol == "grpc" else base.rstrip("/") + TRACES_PATH


def _sampler(ratio: float, env: Mapping[str, str]) -> Sampler:
    raw_arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    if raw_arg is not None:
        try:
            parsed = float(raw_arg)
        except ValueError:
            parsed = math.nan
        if 0.0 <= parsed <= 1.0:
            ratio = parsed
        else:
            event(
                "ignored OTEL_TRACES_SAMPLER_ARG",
                level=logging.WARNING,
                logger=log.name,
                problem="not a number between 0 and 1",
            )
    choices: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    name = _pick(
        env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or None,
        tuple(choices),
        "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER",
    )
    return choices[name]()


def _pick(value: str | None, allowed: Sequence[str], fallback: str, variable: str) -> str:
    if value is None or value == "":
        return fallback
    if value in allowed:
        return value
    event(
        "ignored unsupported value",
        level=logging.WARNING,
        logger=log.name,
        key_path=variable,
        problem=f"expected one of {', '.join(allowed)}",
    )
    return fallback


def _positive(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable)
    if raw is None:
        return default
    if raw.strip().isdigit() and int(raw) > 0:
        return int(raw)
    event(
        "ignored unsupported value",
        level=logging.WARNING,
        logger=log.name,
        key_path=variable,
        problem="expected a positive integer",
    )
    return default


# ---- the export path: a bounded queue in front of one export thread


class SpanQueue(SpanProcessor):
    """Ended, sampled spans wait here for the export thread; a full queue drops the span.

    `on_end` runs on the call's path, so it only appends under a short lock:
    it never blocks on the exporter. Every span that does not reach the
    collector is counted in `dropped` (queue full, export failed, or still
    waiting when shutdown ran out of time) and reported through `on_drop`.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int,
        max_batch: int,
        delay: float,
        on_drop: Callable[[int, str], None],
    ) -> None:
        if max_queue_size < 1 or max_batch < 1 or delay <= 0:
            raise ValueError("queue size and batch size must be positive, delay above zero")
        self._exporter = exporter
        self._max_queue_size = max_queue_size
        self._max_batch = min(max_batch, max_queue_size)
        self._delay = delay
        self._on_drop = on_drop
        self._queue: deque[ReadableSpan] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the export thread waits here
        self._settle = threading.Condition(self._lock)  # force_flush waits here
        self._received = 0  # spans ever queued
        self._settled = 0  # queued spans since exported or dropped
        self._in_export = 0  # spans in the batch being exported now
        self._flush_to = 0  # force_flush wants `_settled` to reach this
        self._dropped = 0
        self._closing = False
        self._abandoned = False  # shutdown gave up waiting: drop whatever is left
        self._thread = threading.Thread(target=self._run, name="sidecar-span-export", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._dropped

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._lock:
            full = self._closing or len(self._queue) >= self._max_queue_size
            if full:
                self._dropped += 1
            else:
                self._queue.append(span)
                self._received += 1
                if len(self._queue) >= self._max_batch:
                    self._wake.notify()
        if full:
            self._on_drop(1, "shut_down" if self._closing else "queue_full")

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until every span queued so far was exported or dropped, at most the timeout."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            target = self._received
            self._flush_to = max(self._flush_to, target)
            self._wake.notify()
            while self._settled < target and not self._abandoned:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._settle.wait(left)
            return not self._abandoned

    def shutdown(self, timeout: float = EXPORT_TIMEOUT) -> None:
        """Export what is queued within `timeout` seconds; count the rest as dropped."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._lock:
            lost = 0
            if self._thread.is_alive():  # stuck on a slow collector: stop waiting for it
                lost = len(self._queue) + self._in_export
                self._queue.clear()
                self._dropped += lost
                self._abandoned = True
                self._settle.notify_all()
        if lost:
            self._on_drop(lost, "shut_down")
        self._exporter.shutdown()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._export(batch)

    def _next_batch(self) -> list[ReadableSpan] | None:
        """The next batch to send: at once when urgent, else after `delay`; None to stop."""
        with self._lock:
            if not self._urgent():
                self._wake.wait(self._delay)
            if self._abandoned or (self._closing and not self._queue):
                return None
            count = min(self._max_batch, len(self._queue))
            self._in_export = count
            return [self._queue.popleft() for _ in range(count)]

    def _urgent(self) -> bool:
        return (
            self._closing
            or len(self._queue) >= self._max_batch
            or (self._flush_to > self._settled and bool(self._queue))
        )

    def _export(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self._exporter.export([_without_trace_state(s) for s in batch])
            ok = result is SpanExportResult.SUCCESS
        except Exception:  # an exporter bug must not end the export thread
            ok = False
        with self._lock:
            if self._abandoned:  # shutdown already counted this batch
                return
            self._in_export = 0
            self._settled += len(batch)
            if not ok:
                self._dropped += len(batch)
            self._settle.notify_all()
        if not ok:
            self._on_drop(len(batch), "export_failed")


def _without_trace_state(span: ReadableSpan) -> ReadableSpan:
    """`span` as it may leave the process: its W3C `tracestate` emptied.

    The SDK copies the caller's `tracestate` header into every span of the
    trace, and exporters send it on; it is a header value the app wrote, so
    it stays out of spans (SPEC "Audit log"). It is still forwarded on the
    wire: `_send_context` reads the live span, not this copy.
    """
    context = span.context
    if context is None or not context.trace_state:
        return span
    return ReadableSpan(
        name=span.name,
        context=SpanContext(
            context.trace_id, context.span_id, context.is_remote, context.trace_flags
        ),
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class DropReport:
    """Logs dropped spans at most once per `every` seconds, with the count since the last line."""

    def __init__(
        self, *, every: float = DROP_REPORT_EVERY, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last: float | None = None

    def __call__(self, count: int, cause: str) -> None:
        with self._lock:
            self._pending[cause] = self._pending.get(cause, 0) + count
            now = self._monotonic()
            if self._last is not None and now - self._last < self._every:
                return
            self._last = now
            pending, self._pending = self._pending, {}
        self._emit(pending)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        self._emit(pending)

    def _emit(self, pending: dict[str, int]) -> None:
        for cause, dropped in sorted(pending.items()):
            event(
                "trace spans dropped",
                level=logging.WARNING,
                logger=log.name,
                dropped=dropped,
                cause=cause,
            )


# ---- the process's tracer


_PINNED_TRACE_ID: ContextVar[int | None] = ContextVar("sidecar_pinned_trace_id", default=None)


class _CallIds(RandomIdGenerator):
    """Random ids, except that a root span takes the trace id its call already has."""

    def generate_trace_id(self) -> int:
        pinned = _PINNED_TRACE_ID.get()
        return pinned if pinned is not None else super().generate_trace_id()

    def fresh_trace_id(self) -> int:
        return super().generate_trace_id()


class Tracing:
    """The process's TracerProvider, its export queue and the drop count."""

    def __init__(
        self, plan: ExportPlan, exporter: SpanExporter | None, *, report: DropReport | None = None
    ) -> None:
        self.plan = plan
        self.service_name = plan.service_name
        self._ids = _CallIds()
        self._report = report or DropReport()
        self._provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: plan.service_name}),
            sampler=plan.sampler,
            id_generator=self._ids,
            shutdown_on_exit=False,  # shutdown() is bounded; an atexit hook would not be
        )
        self._queue: SpanQueue | None = None
        if exporter is not None:
            self._queue = SpanQueue(
                exporter,
                max_queue_size=plan.max_queue_size,
                max_batch=plan.max_batch,
                delay=plan.delay,
                on_drop=self._report,
            )
            self._provider.add_span_processor(self._queue)
        self._tracer = self._provider.get_tracer("sidecar")

    @property
    def dropped(self) -> int:
        """Spans that never reached the collector: queue full, export failed, shutdown."""
        return self._queue.dropped if self._queue is not None else 0

    def new_trace_id(self) -> int:
        return self._ids.fresh_trace_id()

    def start_span(self, name: str, *, kind: SpanKind, parent: Context, trace_id: int) -> Span:
        """A span under `parent`, or a root span in `trace_id` when there is no parent.

        Exceptions are never recorded on it: their messages may quote the request.
        """
        token = _PINNED_TRACE_ID.set(trace_id)
        try:
            span = self._tracer.start_span(
                name,
                context=parent,
                kind=kind,
                record_exception=False,
                set_status_on_exception=False,
            )
        finally:
            _PINNED_TRACE_ID.reset(token)
        if not span.get_span_context().is_valid:
            # OTEL_SDK_DISABLED makes the SDK hand out no-op spans without ids;
            # the audit log and the next hop still need a context.
            context = SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False)
            span = NonRecordingSpan(context)
        return span

    def force_flush(self, timeout: float = EXPORT_TIMEOUT) -> bool:
        return self._queue.force_flush(int(timeout * 1000)) if self._queue is not None else True

    def shutdown(self, timeout: float = EXPORT_TIMEOUT) -> None:
        """Export what is queued, waiting at most `timeout` seconds, then stop."""
        if self._queue is not None:
            self._queue.shutdown(timeout)
        self._provider.shutdown()
        self._report.flush()


def setup_tracing(
    cfg: settings.Tracing,
    *,
    service_name: str,
    env: Mapping[str, str] | None = None,
    max_queue_size: int | None = None,
    max_batch: int | None = None,
    delay: float | None = None,
    export_timeout: float | None = None,
) -> Tracing:
    """The process's `Tracing`, from config and the OTEL_* variables (`env`, default os.environ).

    The keyword queue sizes, schedule `delay` and `export_timeout` (seconds)
    override both, for tests and embedding.
    """
    plan = plan_export(cfg, service_name=service_name, env=os.environ if env is None else env)
    sizes = (max_queue_size, max_batch, delay, export_timeout)
    if any(value is not None and value <= 0 for value in sizes):
        raise ValueError("max_queue_size, max_batch, delay and export_timeout must be positive")
    plan = replace(
        plan,
        max_queue_size=max_queue_size or plan.max_queue_size,
        max_batch=max_batch or plan.max_batch,
        delay=delay or plan.delay,
        timeout=export_timeout or plan.timeout,
    )
    tracing = Tracing(plan, _exporter(plan))
    event(
        "tracing ready",
        logger=log.name,
        exporter=plan.exporter,
        endpoint=plan.endpoint or None,
        service=plan.service_name,
    )
    return tracing


def _exporter(plan: ExportPlan) -> SpanExporter | None:
    if plan.exporter == "console":
        # stderr, one line a span: stdout carries the JSON log lines.
        return ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    if plan.exporter != "otlp":
        return None
    if plan.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=plan.endpoint, timeout=plan.timeout)
    from sidecar.telemetry.http_export import DirectHttpExporter

    return DirectHttpExporter(endpoint=plan.endpoint, timeout=plan.timeout)
