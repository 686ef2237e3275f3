"""How a sidecar process gets its workflows: the engine on its store, and the shipper.

`open_engine` opens the store `workflows.store` names and builds the engine
(its metrics added to the process's); `start_shipper` starts audit shipping
when `audit.ship` is set. The server calls both, with `handler`, the
outbound stack of whichever config is in force.
"""

from __future__ import annotations

import logging

from sidecar.clock import Clock
from sidecar.config.settings import Config
from sidecar.paths import RouteTable
from sidecar.stack import Handler
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing
from sidecar.workflows.backends import open_store
from sidecar.workflows.engine import Engine, lease_for
from sidecar.workflows.shipping import Shipper

log = logging.getLogger("sidecar")


class StoreUnavailable(Exception):
    """The workflow store could not be opened; the log says why."""


async def open_engine(config: Config, *, handler: Handler, tracing: Tracing, metrics: Metrics,
                      clock: Clock) -> Engine:
    """The engine of `config.workflows`, its store open; StoreUnavailable if it cannot be."""
    assert config.workflows is not None
    try:
        store = await open_store(config.workflows.store)
    except Exception as exc:
        # Our own messages (another process holds the file) and the OS's are safe to
        # show; a driver's may quote the URL.
        shown = str(exc) if isinstance(exc, RuntimeError | OSError) else None
        log.error("workflow store could not be opened",
                  extra={"error": type(exc).__name__, "detail": shown})
        raise StoreUnavailable from None
    timeouts = [service.policy.timeout for service in config.services.values()]
    engine = Engine(store=store, handler=handler, settings=config.workflows,
                    service=config.service, tracing=tracing, clock=clock,
                    lease=lease_for(max(timeouts, default=config.defaults.timeout)),
                    metrics=metrics)
    metrics.count_workflows(dead_letters=lambda: engine.dead_letters)
    return engine


def start_shipper(config: Config, engine: Engine, *, handler: Handler, tracing: Tracing,
                  clock: Clock) -> Shipper | None:
    """Audit shipping, started, when `audit.ship` is set (its cursor in the engine's store)."""
    ship = config.audit.ship
    if ship is None or config.audit.path is None:
        return None
    routes = RouteTable(config.services[ship.service].routes)
    shipper = Shipper(settings=ship, audit_path=config.audit.path, store=engine.store,
                      handler=handler, service=config.service, route=routes.template(ship.path),
                      tracing=tracing, clock=clock)
    shipper.start()
    return shipper
