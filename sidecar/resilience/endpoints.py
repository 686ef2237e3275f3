"""Choosing an endpoint of a service, and keeping failing ones out for a while.

Balancing is least-in-flight of two random choices: nearly as good as
scanning every endpoint, without herding every caller onto the same one.
Outlier detection ejects an endpoint after `consecutive_failures` failures
for `base_ejection` times the number of its ejections, but never longer than
`max_ejection` (Envoy's `max_ejection_time`; `base_ejection` if that is
longer, as in Envoy), so an endpoint that failed often is still tried again
within minutes. At most `max_ejected_percent` of a service's endpoints
(rounded down) are out at once, and a service's only endpoint is never
ejected (its breaker covers that). Optional active health checks mark
endpoints healthy or unhealthy.

Name resolution is not done here: the transport's aiohttp connector caches
DNS answers only briefly (`ttl_dns_cache`), so a changed address is picked up
without restarting.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import aiohttp

from sidecar.clock import Clock
from sidecar.config.settings import HealthCheck, OutlierPolicy
from sidecar.resilience.classify import Outcome
from sidecar.tls.contexts import mesh_url
from sidecar.tls.material import MeshTLS

log = logging.getLogger("sidecar")

OnEject = Callable[[str, str, float], None]  # (service, url, seconds ejected)


class Endpoint:
    """One upstream address with its load, health and ejection record."""

    __slots__ = (
        "_owner",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "healthy",
        "in_flight",
        "url",
    )

    def __init__(self, url: str, owner: Endpoints) -> None:
        self.url = url
        self.in_flight = 0
        self.healthy = True
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until: float | None = None
        self._owner = owner

    @property
    def ejected(self) -> bool:
        if self.ejected_until is None:
            return False
        if self._owner.clock.monotonic() >= self.ejected_until:
            self.ejected_until = None  # its time is over: back in rotation
            return False
        return True

    def start(self) -> None:
        """An attempt to this endpoint begins."""
        self.in_flight += 1

    def finish(self, outcome: Outcome | None) -> None:
        """The attempt ended; `outcome` None (cancelled) counts for nothing."""
        self.in_flight = max(0, self.in_flight - 1)
        if outcome is not None:
            self.record(outcome)

    def record(self, outcome: Outcome) -> None:
        self._owner.record(self, outcome)

    def state(self) -> dict[str, object]:
        return {"url": self.url, "healthy": self.healthy, "ejected": self.ejected}


class Endpoints:
    """A service's endpoints: `pick()` one per attempt, report with `finish()`."""

    def __init__(
        self,
        urls: Sequence[str],
        outlier: OutlierPolicy,
        health_check: HealthCheck | None = None,
        *,
        clock: Clock,
        rng: random.Random | None = None,
        service: str = "",
        on_eject: OnEject | None = None,
        tls: MeshTLS | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a service needs at least one endpoint")
        if outlier.consecutive_failures < 1 or not 0 <= outlier.max_ejected_percent <= 100:
            raise ValueError("consecutive_failures >= 1 and max_ejected_percent in 0..100")
        self.service = service
        self.outlier = outlier
        self.health_check = health_check
        self.clock = clock
        self.endpoints = tuple(Endpoint(url, self) for url in urls)
        self._rng = rng or random.Random()
        self._on_eject = on_eject
        self._tls = tls  # a mesh service with TLS on: probes go as calls do

    def available(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.healthy and not e.ejected]

    def pick(self) -> Endpoint:
        """Least in flight of two random available endpoints.

        With none available (every one failing its health check) all of them
        are candidates again: a guess beats refusing every call, and the
        breaker still stops a service that is really down.
        """
        candidates = self.available() or list(self.endpoints)
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return second if second.in_flight < first.in_flight else first

    def record(self, endpoint: Endpoint, outcome: Outcome) -> None:
        """Count an attempt's outcome; eject the endpoint when it keeps failing."""
        if endpoint.ejected:
            return  # late news from before the ejection
        if not outcome.failed:
            endpoint.consecutive_failures = 0
            return
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures >= self.outlier.consecutive_failures and self._room():
            self._eject(endpoint)

    def _room(self) -> bool:
        """Whether one more ejection stays within `max_ejected_percent` (rounded down)."""
        total = len(self.endpoints)
        if total < 2:
            return False
        cap = total * self.outlier.max_ejected_percent // 100
        return sum(1 for e in self.endpoints if e.ejected) < cap

    def _eject(self, endpoint: Endpoint) -> None:
        endpoint.ejections += 1
        outlier = self.outlier
        cap = max(outlier.max_ejection, outlier.base_ejection)
        seconds = min(outlier.base_ejection * endpoint.ejections, cap)
        endpoint.ejected_until = self.clock.monotonic() + seconds
        endpoint.consecutive_failures = 0
        if self._on_eject is not None:
            self._on_eject(self.service, endpoint.url, seconds)

    def state(self) -> list[dict[str, object]]:
        """For /admin/services: `[{"url", "healthy", "ejected"}, ...]`."""
        return [e.state() for e in self.endpoints]

    async def probe_all(self, session: aiohttp.ClientSession) -> None:
        """One active health check of every endpoint, side by side."""
        if self.health_check is None:
            return
        check = self.health_check
        await asyncio.gather(*(self._probe(session, e, check) for e in self.endpoints))

    async def probe_loop(self, session: aiohttp.ClientSession) -> None:
        """Probes every `interval` until cancelled; start it through `TaskGroup.start`."""
        if self.health_check is None:
            return
        while True:
            await self.probe_all(session)
            await self.clock.sleep(self.health_check.interval)

    async def _probe(
        self, session: aiohttp.ClientSession, endpoint: Endpoint, check: HealthCheck
    ) -> None:
        url, context, name = endpoint.url, None, None
        if self._tls is not None:
            url, context, name = mesh_url(url), self._tls.client, self.service
        url = url.rstrip("/") + check.path
        try:
            async with session.get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=check.timeout),
                ssl=context or True, server_hostname=name,
            ) as response:
                healthy = 200 <= response.status < 300
        except (aiohttp.ClientError, OSError, TimeoutError):
            healthy = False
        if healthy != endpoint.healthy:
            log.info(
                "endpoint health changed",
                extra={"peer": self.service, "endpoint": endpoint.url, "healthy": healthy},
            )
        endpoint.healthy = healthy
