"""The sidecar process: three listeners, the stacks behind them, drain and reload."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, replace

from aiohttp import web
from multidict import CIMultiDict

from sidecar.admin import admin_app
from sidecar.audit import layer as auditing
from sidecar.audit.log import AuditLog
from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.config import loader as config_loader
from sidecar.config.settings import Config, Limits
from sidecar.http import edge, listener, transport
from sidecar.http.headers import ATTEMPTS, REASON, SIDECAR_PREFIX
from sidecar.inbound import stack as inbound_stack
from sidecar.outbound import stack as outbound_stack
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.bulkhead import Bulkheads
from sidecar.resilience.pools import Pools
from sidecar.stack import Body, Call, Direction, Handler, Reply
from sidecar.tasks import TaskGroup
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import setup_tracing
from sidecar.wiring import Shared, Wiring, wire

log = logging.getLogger("sidecar")

# Settings a reload cannot change in a running process (SPEC: listen addresses
# are kept until a restart; limits, audit file and tracing live in the listeners,
# the audit log and the tracer, which are built once).
MESH_HEADERS = 8
RESTART_ONLY = ("service", "listen", "limits", "audit", "tracing")


@dataclass(frozen=True, slots=True)
class Stacks:
    """The handlers of one config, swapped together on reload."""

    wiring: Wiring
    outbound: Handler
    inbound: Handler


class Sidecar:
    """One sidecar: owns its listeners, its shared state and the current stacks."""

    def __init__(self, config: Config, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self.tasks = TaskGroup()
        self.draining = False
        self.listening = False
        self.stopped = asyncio.Event()
        self._runners: list[web.BaseRunner] = []
        self._sites: dict[str, web.TCPSite] = {}
        self._servers: dict[str, listener.GuardedServer] = {}
        self.shared: Shared | None = None
        self.stacks: Stacks | None = None

    # -- start -------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
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
                        on_eject=self._ejected),
            # `/metrics` reads each breaker's state when scraped.
            metrics=Metrics(peers=config.services, circuit_states=breakers.states),
            tracing=setup_tracing(config.tracing, service_name=config.service),
        )
        self._reload_state(config)
        self.stacks = self._build(config)
        limits = config.limits
        # The calling sidecar adds a few headers of its own (token, trace
        # context, deadline): a call within the limit at its app stays within it here.
        inbound_limits = replace(limits, max_headers=limits.max_headers + MESH_HEADERS)
        await self._listen("inbound", self._inbound, config.listen.inbound, inbound_limits)
        await self._listen("outbound", self._outbound, config.listen.outbound, limits)
        admin = web.AppRunner(admin_app(self), handle_signals=False, access_log=None,
                              shutdown_timeout=1.0)
        await admin.setup()
        host, port = config.listen.admin
        site = web.TCPSite(admin, host, port, reuse_address=True)
        await site.start()
        self._runners.append(admin)
        self._sites["admin"] = site
        self.listening = True
        log.info("sidecar started", extra={
            "service": config.service,
            "listeners": {name: f"{h}:{p}" for name, (h, p) in self.addresses().items()},
            "services": sorted(config.services),
            "policy_rules": len(config.inbound.policy or ()),
        })

    def _build(self, config: Config) -> Stacks:
        assert self.shared is not None
        wiring = wire(config, self.clock)
        return Stacks(
            wiring=wiring,
            outbound=outbound_stack.build(self.shared, wiring),
            inbound=inbound_stack.build(self.shared, wiring),
        )

    async def _listen(self, name: str, handler: listener.RawHandler,
                      address: tuple[str, int], limits: Limits) -> None:
        direction: Direction = "inbound" if name == "inbound" else "outbound"
        runner, site, server = await listener.start(
            handler, address[0], address[1], limits=limits,
            on_refused=lambda reply: self._refused(direction, reply),
            # No attempt is made for a request refused while parsing.
            answer_headers={ATTEMPTS: "0"} if direction == "outbound" else None)
        self._runners.append(runner)
        self._sites[name] = site
        self._servers[name] = server

    def addresses(self) -> dict[str, tuple[str, int]]:
        """The bound address of each listener (the real port when 0 was asked)."""
        out = {}
        for name, site in self._sites.items():
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                host, port = sockets[0].getsockname()[:2]
                out[name] = (host, port)
        return out

    # -- state for the admin port ------------------------------------------------

    def in_flight(self, service: str) -> int:
        assert self.shared is not None
        return self.shared.bulkheads.for_service(service).in_flight

    def endpoint_state(self, service: str) -> list[dict[str, object]]:
        assert self.shared is not None
        return self.shared.pools.state(service)

    def render_metrics(self) -> tuple[bytes, str]:
        assert self.shared is not None
        return self.shared.metrics.render()

    # -- the two data-path edges ---------------------------------------------

    async def _outbound(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.stacks is not None
        return await edge.serve(
            request, self.stacks.outbound, "outbound",
            body_limit=self.config.limits.max_request_body,
            idle=self.config.limits.idle_timeout,
            extra=_outbound_headers, closing=lambda: False, source=self.config.service,
            clock=self.clock,
        )

    async def _inbound(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.stacks is not None
        return await edge.serve(
            request, self.stacks.inbound, "inbound",
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

    def _ejected(self, service: str, url: str, seconds: float) -> None:
        log.warning("endpoint ejected", extra={"peer": service, "endpoint": url,
                                               "duration_s": seconds})
        if self.shared is not None:
            self.shared.metrics.ejected(service)

    def _breaker_changed(self, service: str, old: str, new: str) -> None:
        log.warning("circuit breaker changed", extra={"peer": service, "previous": old,
                                                       "state": new})

    def reload(self) -> bool:
        """Re-read config, keys and JWKS; swap them in whole, or keep the old on error."""
        path = self.config.source_file
        if path is None:
            return False
        try:
            new = config_loader.load(path)
            # Listeners, the audit file and the tracer are built once per process.
            fixed = {key: getattr(self.config, key) for key in RESTART_ONLY
                     if getattr(new, key) != getattr(self.config, key)}
            if fixed:
                log.warning("config changes that apply after a restart were kept as they are",
                            extra={"changed": sorted(fixed)})
                new = replace(new, **fixed)
            stacks = self._build(new)
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
        self.stacks = stacks
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
        inbound_site = self._sites.get("inbound")
        if inbound_site is not None and inbound_site._server is not None:
            inbound_site._server.close()
        inbound = self._servers.get("inbound")
        if inbound is not None:
            for protocol in list(inbound.connections):
                # Idle keep-alive connections go now; busy ones after their answer.
                if protocol._request_in_progress:
                    protocol.close()
                else:
                    protocol.force_close()
        outbound = self._servers.get("outbound")
        while loop.time() < ends:
            busy_in = inbound is not None and inbound.connections
            busy_out = outbound is not None and outbound.connections
            if not busy_in and not busy_out:
                break
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.shared is not None:
            await self.shared.session.close()
            await self.shared.audit.close()
            await asyncio.get_running_loop().run_in_executor(None, self.shared.tracing.shutdown)
        await self.tasks.close()
        self.stopped.set()


def _outbound_headers(call: Call, reply: Reply, headers: CIMultiDict[str]) -> None:
    headers[ATTEMPTS] = str(call.attempts)
    if reply.reason and REASON not in headers:
        headers[REASON] = reply.reason


def _inbound_headers(call: Call, reply: Reply, headers: CIMultiDict[str]) -> None:
    # The app may not speak for the sidecar: only our own x-sidecar-* leave.
    for name in [n for n in headers if n.lower().startswith(SIDECAR_PREFIX)]:
        headers.popall(name)
    if reply.made_here and reply.reason:
        headers[REASON] = reply.reason


async def serve(config: Config) -> int:
    sidecar = Sidecar(config)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM,
                            lambda: sidecar.tasks.start("drain", sidecar.drain()))
    loop.add_signal_handler(signal.SIGINT,
                            lambda: sidecar.tasks.start("drain", sidecar.drain()))
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload)
    await sidecar.stopped.wait()
    log.info("stopped")
    return 0


def run_forever(config: Config) -> int:
    from sidecar.telemetry.logs import setup_logging

    setup_logging()
    return asyncio.run(serve(config))
