"""The sidecar process: three listeners, the stacks behind them, drain and reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.admin import admin_app
from sidecar.audit import layer as auditing
from sidecar.audit.log import AuditLog
from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.config import loader as config_loader
from sidecar.config.settings import Config, Limits
from sidecar.http import edge, listener, problem, transport
from sidecar.http.headers import ATTEMPTS, REASON, SIDECAR_PREFIX
from sidecar.inbound.overload import InFlight
from sidecar.inbound.ratelimit import RateLimits
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.bulkhead import Bulkheads
from sidecar.resilience.pools import Pools
from sidecar.stack import Body, Call, Direction, Reply
from sidecar.tasks import TaskGroup
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import setup_tracing
from sidecar.tls.material import MeshTLS
from sidecar.wiring import Shared, Wiring, wire
from sidecar.workflows.lifecycle import StoreUnavailable, open_engine, start_shipper
from sidecar.workflows.shipping import Shipper

log = logging.getLogger("sidecar")

# Settings a reload cannot change in a running process (SPEC: listen addresses
# are kept until a restart; limits, audit file, tracing and the workflow store
# live in the listeners, the audit log, the tracer and the engine, built once).
MESH_HEADERS = 8
RESTART_ONLY = ("service", "listen", "limits", "audit", "tracing", "workflows", "tls")
TLS_RESTART_ONLY = ("trust_domain",)
# What a failed TLS handshake on the inbound port is audited and counted as.
HANDSHAKE_FAILED = problem.reply(
    "tls_required", "The TLS handshake failed: this port takes mutual TLS with a certificate "
    "of the mesh CA that is in date.")


class StartFailed(Exception):
    """The sidecar could not start; the log says why."""


class Sidecar:
    """One sidecar: owns its listeners, its shared state and the current stacks."""

    def __init__(self, config: Config, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self.tasks = TaskGroup()
        self.draining = False
        self.listening = False
        self.stopped = asyncio.Event()
        self._listeners: dict[str, listener.Listener] = {}
        self.shared: Shared | None = None
        self.wiring: Wiring | None = None
        self.shipper: Shipper | None = None
        self.tls: MeshTLS | None = None

    # -- start -------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        if config.tls.enabled:
            assert config.trust_domain is not None
            self.tls = MeshTLS(config.tls, service=config.service,
                               trust_domain=config.trust_domain, clock=self.clock)
            self.tls.load()
        audit = AuditLog(config.audit.path, clock=self.clock)
        await audit.start()
        session = transport.new_session(connect_timeout=config.defaults.connect_timeout)
        breakers = Breakers({}, self.clock, on_change=self._breaker_changed)
        self.shared = Shared(
            clock=self.clock,
            session=session,
            audit=audit,
            breakers=breakers,
            budgets=RetryBudgets({}, self.clock),
            bulkheads=Bulkheads({}),
            pools=Pools(clock=self.clock, tasks=self.tasks, session=session,
                        on_eject=self._ejected, tls=self.tls),
            # `/metrics` reads each breaker's state and the certificates' expiry when scraped.
            metrics=Metrics(peers=config.services, circuit_states=breakers.states,
                            certificates=lambda: self.tls.expiry() if self.tls else []),
            tracing=setup_tracing(config.tracing, service_name=config.service),
            rate_limits=RateLimits(self.clock),
            in_flight=InFlight(),
            tls=self.tls,
        )
        self._reload_state(config)
        if config.workflows is not None:
            try:
                self.shared.workflows = await open_engine(
                    config, handler=self._workflow_call, tracing=self.shared.tracing,
                    metrics=self.shared.metrics, clock=self.clock)
            except StoreUnavailable:
                raise StartFailed from None
        self.wiring = wire(config, self.shared)
        limits = config.limits
        # The calling sidecar adds a few headers of its own (token, trace
        # context, deadline): a call within the limit at its app stays within it here.
        inbound_limits = replace(limits, max_headers=limits.max_headers + MESH_HEADERS)
        await self._listen("inbound", self._inbound, config.listen.inbound, inbound_limits,
                           tls=self.tls)
        await self._listen("outbound", self._outbound, config.listen.outbound, limits)
        host, port = config.listen.admin
        self._listeners["admin"] = await listener.start_app(admin_app(self), host, port)
        if self.tls is not None:
            # New files reach new connections; open ones finish on the old ones.
            self.tasks.start("tls-watch", self.tls.watch())
        self.listening = True
        if self.shared.workflows is not None:
            # After the stacks: resumed work goes out through them at once.
            await self.shared.workflows.start()
            self.shipper = start_shipper(config, self.shared.workflows,
                                         handler=self._workflow_call,
                                         tracing=self.shared.tracing, clock=self.clock)
        parser = listener.parser_in_use()
        log.info("sidecar started", extra={
            "service": config.service,
            "listeners": {name: f"{h}:{p}" for name, (h, p) in self.addresses().items()},
            "services": sorted(config.services),
            "policy_rules": len(config.inbound.policy or ()),
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "http_parser": parser,
        })
        if parser != "llhttp":
            log.warning("aiohttp's C HTTP parser is not in use: requests are parsed by its "
                        "slower, laxer Python parser (AIOHTTP_NO_EXTENSIONS set, or no "
                        "compiled extension for this platform)", extra={"http_parser": parser})

    async def _listen(self, name: str, handler: listener.RawHandler,
                      address: tuple[str, int], limits: Limits,
                      tls: MeshTLS | None = None) -> None:
        direction: Direction = "inbound" if name == "inbound" else "outbound"
        self._listeners[name] = await listener.start(
            handler, address[0], address[1], limits=limits,
            on_refused=lambda reply: self._refused(direction, reply),
            # No attempt is made for a request refused while parsing.
            answer_headers={ATTEMPTS: "0"} if direction == "outbound" else None,
            # Asked per connection, so a rotation reaches every new one.
            tls=(lambda: tls.server) if tls is not None else None,
            on_handshake_failed=lambda: self._refused(direction, HANDSHAKE_FAILED))

    async def _workflow_call(self, call: Call) -> Reply:
        """A workflow's call, through the outbound stack of the config in force now."""
        assert self.wiring is not None
        return await self.wiring.outbound(call)

    def addresses(self) -> dict[str, tuple[str, int]]:
        """The bound address of each listener (the real port when 0 was asked)."""
        return {name: address for name, held in self._listeners.items()
                if (address := held.address) is not None}

    # -- what the admin port sees (admin.AdminView) -----------------------------

    def not_ready(self) -> list[str]:
        """Why the process itself is not ready (the app's health is the admin's to ask)."""
        reasons = []
        if self.draining:
            reasons.append("draining")
        if self.wiring is None:
            reasons.append("config or keys not loaded")
        if not self.listening:
            reasons.append("listeners not up")
        if self.tls is not None:
            reasons += self.tls.not_ready()
        return reasons

    def outbound_not_ready(self) -> list[str]:
        """Why the app cannot call out through this sidecar yet (for `sidecar wait`).

        Draining does not count: the outbound path serves the app until it exits.
        """
        reasons = []
        if self.wiring is None:
            reasons.append("config or keys not loaded")
        held = self._listeners.get("outbound")
        if held is None or held.address is None:
            reasons.append("outbound listener not up")
        return reasons

    def shutdown(self) -> None:
        """SIGTERM's drain, also for `POST /admin/shutdown`; started once."""
        if not self.draining:
            self.tasks.start("drain", self.drain())

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self.shared.session if self.shared is not None else None

    def service_state(self) -> dict[str, Any]:
        """For /admin/services: breaker, in-flight calls and endpoints per service."""
        out: dict[str, Any] = {}
        shared = self.shared
        for name in self.config.services:
            out[name] = {
                "breaker": shared.breakers.for_service(name).state if shared else "closed",
                "in_flight": shared.bulkheads.for_service(name).in_flight if shared else 0,
                "endpoints": shared.pools.state(name) if shared else [],
            }
        return out

    async def workflow_state(self) -> dict[str, Any] | None:
        engine = self.shared.workflows if self.shared is not None else None
        return await engine.state() if engine is not None else None

    def render_metrics(self) -> tuple[bytes, str]:
        assert self.shared is not None
        return self.shared.metrics.render()

    # -- the two data-path edges ---------------------------------------------

    async def _outbound(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.wiring is not None
        return await edge.serve(
            request, self.wiring.outbound, "outbound",
            body_limit=self.config.limits.max_request_body,
            idle=self.config.limits.idle_timeout,
            extra=_outbound_headers, closing=lambda: False, source=self.config.service,
            clock=self.clock,
        )

    async def _inbound(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.wiring is not None
        return await edge.serve(
            request, self.wiring.inbound, "inbound",
            body_limit=self.config.limits.max_request_body,
            idle=self.config.limits.idle_timeout,
            extra=_inbound_headers, closing=lambda: self.draining,
            target=self.config.service, clock=self.clock,
        )

    def _refused(self, direction: Direction, reply: Reply) -> None:
        """A request refused while being parsed (400, 431) is audited and counted too.

        Nothing of it is known but that it came: the method and path stay unnamed.
        """
        assert self.shared is not None
        own = self.config.service
        inbound = direction == "inbound"
        call = Call(direction=direction, method="OTHER", path="/", query="",
                    headers=CIMultiDict(), body=Body.empty(), route="/{invalid}",
                    source="anonymous" if inbound else own,
                    target=own if inbound else "unknown", started=self.clock.monotonic())
        auditing.write_record(self.shared.audit, call, reply, clock=self.clock)
        self.shared.metrics.answered(direction, "anonymous" if inbound else "unknown", "OTHER",
                                     str(reply.status), reply.reason or "", 0.0)

    # -- state changes ---------------------------------------------------------

    def _reload_state(self, config: Config) -> None:
        """Per-service state follows the config; unchanged services keep theirs."""
        assert self.shared is not None
        services = config.services
        self.shared.breakers.reload({n: s.policy.circuit_breaker for n, s in services.items()})
        self.shared.budgets.reload({n: s.policy.retry.budget for n, s in services.items()})
        self.shared.bulkheads.reload({n: s.policy.bulkhead for n, s in services.items()})
        self.shared.pools.reload(services)
        self.shared.metrics.set_peers(services)
        self.shared.rate_limits.reload(config.inbound.rate_limits)

    def _ejected(self, service: str, url: str, seconds: float) -> None:
        log.warning("endpoint ejected", extra={"peer": service, "endpoint": url,
                                               "duration_s": seconds})
        if self.shared is not None:
            self.shared.metrics.ejected(service)

    def _breaker_changed(self, service: str, old: str, new: str) -> None:
        log.warning("circuit breaker changed", extra={"peer": service, "previous": old,
                                                       "state": new})

    def reload(self) -> bool:
        """Re-read config, keys, JWKS and certificates; swap them in whole, or keep the old
        on error (the certificate files on their own: they do not wait for the config)."""
        if self.tls is not None:
            self.tls.reload()
        path = self.config.source_file
        if path is None:
            return False
        try:
            new = config_loader.load(path)
            # Listeners, the audit file and the tracer are built once per process, and
            # so are the TLS settings with the trust domain their SPIFFE IDs live in.
            kept = RESTART_ONLY + (TLS_RESTART_ONLY if self.tls is not None else ())
            fixed = {key: getattr(self.config, key) for key in kept
                     if getattr(new, key) != getattr(self.config, key)}
            if fixed:
                log.warning("config changes that apply after a restart were kept as they are",
                            extra={"changed": sorted(fixed)})
                new = replace(new, **fixed)
            assert self.shared is not None
            wiring = wire(new, self.shared)
        except config_loader.ConfigError as exc:
            log.error("config reload refused; the old config stays",
                      extra={"problem": exc.errors})
            return False
        except (ValueError, OSError) as exc:
            log.error("config reload refused; the old config stays",
                      extra={"problem": [f"identity: {exc}"]})
            return False
        self._reload_state(new)
        self.config = new
        assert self.shared is not None
        # A rotated audit file is picked up: the new file starts its own chain.
        self.tasks.start("audit-reopen", self.shared.audit.reopen())
        self.wiring = wiring
        log.info("config reloaded", extra={"services": sorted(new.services),
                                           "policy_rules": len(new.inbound.policy or ())})
        return True

    async def drain(self) -> None:
        """SIGTERM: stop taking inbound calls, finish those in flight, serve the app
        until it has gone or drain_timeout passes."""
        if self.draining:
            return
        self.draining = True
        log.info("draining", extra={"timeout_s": self.config.drain_timeout})
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.config.drain_timeout
        inbound = self._listeners.get("inbound")
        if inbound is not None:
            inbound.stop_accepting()
            # Idle keep-alive connections go now; busy ones after their answer.
            inbound.finish_and_close()
        data_path = [self._listeners[n] for n in ("inbound", "outbound") if n in self._listeners]
        # Polled: aiohttp tells nobody when its last connection closes.
        while loop.time() < ends and any(held.busy for held in data_path):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        if self.shipper is not None:
            await self.shipper.close()
        if self.shared is not None and self.shared.workflows is not None:
            # First, while the stacks still work: in-flight steps stop, claims are freed.
            await self.shared.workflows.close()
        for held in reversed(list(self._listeners.values())):
            await held.close()
        self._listeners.clear()
        if self.shared is not None:
            await self.shared.session.close()
            await self.shared.audit.close()
            await asyncio.get_running_loop().run_in_executor(None, self.shared.tracing.shutdown)
        await self.tasks.close()
        self.stopped.set()


def _outbound_headers(call: Call, reply: Reply, headers: CIMultiDict[str]) -> None:
    # No upstream speaks for this sidecar: its x-sidecar-* never reach the app
    # as they came. The reason is this sidecar's own, or a table code that a
    # mesh target's sidecar sent (`reasons.relayed`), never free text.
    _drop_sidecar_headers(headers)
    headers[ATTEMPTS] = str(call.attempts)
    if reply.reason:
        headers[REASON] = reply.reason


def _inbound_headers(call: Call, reply: Reply, headers: CIMultiDict[str]) -> None:
    # The app may not speak for the sidecar: only our own x-sidecar-* leave.
    _drop_sidecar_headers(headers)
    if reply.made_here and reply.reason:
        headers[REASON] = reply.reason


def _drop_sidecar_headers(headers: CIMultiDict[str]) -> None:
    for name in [n for n in headers if n.lower().startswith(SIDECAR_PREFIX)]:
        headers.popall(name, None)  # some multidict versions list a repeated name twice


async def serve(config: Config) -> int:
    sidecar = Sidecar(config)
    try:
        await sidecar.start()
    except StartFailed:
        await sidecar.close()
        return 2
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, sidecar.shutdown)
    loop.add_signal_handler(signal.SIGINT, sidecar.shutdown)
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload)
    await sidecar.stopped.wait()
    log.info("stopped")
    return 0


def run_forever(config: Config) -> int:
    from sidecar.telemetry.logs import setup_logging

    setup_logging()
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve(config))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency on Linux), else asyncio's.

    `SIDECAR_UVLOOP=0` keeps asyncio's own loop (for comparison or diagnosis).
    """
    if os.environ.get("SIDECAR_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
