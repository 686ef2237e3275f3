"""Endpoint pools per service, and the layer that picks one per attempt.

`Pools` keeps an `Endpoints` (see `endpoints.py`) per target service across
reloads that leave the service unchanged; `balance` sets `call.endpoint` for
each attempt and feeds its outcome back for outlier detection.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp

from sidecar.clock import Clock
from sidecar.config.settings import Service
from sidecar.resilience.classify import classify
from sidecar.resilience.endpoints import Endpoints
from sidecar.stack import Call, Handler, Layer, Reply
from sidecar.tasks import TaskGroup
from sidecar.tls.material import MeshTLS

OnEject = Callable[[str, str, float], None]


class Pools:
    """An `Endpoints` per target service, kept across reloads that leave it unchanged.

    Active health checks run as one named background task per service.
    """

    def __init__(self, *, clock: Clock, tasks: TaskGroup, session: aiohttp.ClientSession,
                 on_eject: OnEject | None = None, tls: MeshTLS | None = None) -> None:
        self._clock = clock
        self._tls = tls
        self._tasks = tasks
        self._session = session
        self._on_eject = on_eject
        self._pools: dict[str, tuple[Service, Endpoints, asyncio.Task[None] | None]] = {}
        self._retired: dict[str, Endpoints] = {}

    def reload(self, services: Mapping[str, Service]) -> None:
        kept = {}
        for name, (service, pool, task) in self._pools.items():
            if services.get(name) == service:
                kept[name] = (service, pool, task)
            else:
                # Calls begun under the old config may still retry to it.
                self._retired[name] = pool
                if task is not None:
                    task.cancel()
        self._pools = kept
        for name, service in services.items():
            if name not in self._pools:
                pool = Endpoints(service.endpoints, service.policy.outlier_detection,
                                 service.policy.health_check, clock=self._clock,
                                 service=name, on_eject=self._on_eject,
                                 tls=self._tls if service.mesh else None)
                task = None
                if service.policy.health_check is not None:
                    task = self._tasks.start(f"health-check:{name}",
                                             pool.probe_loop(self._session))
                self._pools[name] = (service, pool, task)

    def for_service(self, name: str) -> Endpoints:
        held = self._pools.get(name)
        return held[1] if held is not None else self._retired[name]

    def state(self, name: str) -> list[dict[str, object]]:
        held = self._pools.get(name)
        return held[1].state() if held is not None else []


def balance(*, pools: Pools) -> Layer:
    """Per attempt: picks the endpoint (least in flight of two random choices)
    and reports the attempt's outcome to it for outlier ejection.

    Sits outside `per_attempt` so an attempt cut off by its timeout counts
    against the endpoint; a cancelled attempt does not count.
    """

    async def balance_layer(call: Call, next: Handler) -> Reply:
        endpoint = pools.for_service(call.target).pick()
        call.endpoint = endpoint.url
        call.scheme, call.server_port = _scheme_and_port(endpoint.url)
        endpoint.start()
        try:
            reply = await next(call)
        except asyncio.CancelledError:
            endpoint.finish(None)
            raise
        except Exception as exc:
            endpoint.finish(classify(exc))
            raise
        endpoint.finish(classify(reply))
        return reply

    return balance_layer


@functools.lru_cache(maxsize=1024)
def _scheme_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.scheme, parts.port or (443 if parts.scheme == "https" else 80)

