"""What the stacks are built from: process-lifetime state and per-config wiring."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from sidecar.audit import AuditLog
from sidecar.clock import Clock
from sidecar.identity.tokens import Minter, Verifier
from sidecar.outbound.balancing import Pools
from sidecar.outbound.routing import Target
from sidecar.paths import RouteTable
from sidecar.policy import Policy
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.bulkhead import Bulkheads
from sidecar.settings import Config
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing


@dataclass(slots=True)
class Shared:
    """Lives as long as the process: survives a config reload."""

    clock: Clock
    session: aiohttp.ClientSession
    audit: AuditLog
    breakers: Breakers
    budgets: RetryBudgets
    bulkheads: Bulkheads
    pools: Pools
    metrics: Metrics
    tracing: Tracing


@dataclass(frozen=True, slots=True)
class Wiring:
    """Built from one config; a reload builds a new one and swaps it in whole."""

    config: Config
    minter: Minter
    verifier: Verifier
    policy: Policy
    targets: dict[str, Target]
    own_routes: RouteTable
    local_hosts: frozenset[str]
