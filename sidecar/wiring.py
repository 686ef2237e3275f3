"""What the stacks are built from, in one place.

`Shared` lives as long as the process; `Wiring` is everything one config
decides (keys, policy, routes), built at once by `wire` so a reload swaps it
whole. `check_keys` reports key and policy problems for `check` and `run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from sidecar.audit.log import AuditLog
from sidecar.clock import Clock
from sidecar.config.settings import Config
from sidecar.identity import keys
from sidecar.identity.tokens import Minter, Verifier
from sidecar.inbound.policy import Policy
from sidecar.outbound.routing import Target
from sidecar.paths import RouteTable
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.bulkhead import Bulkheads
from sidecar.resilience.pools import Pools
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


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


def load_identity(config: Config, clock: Clock) -> tuple[Minter, Verifier]:
    """This service's minter and the mesh's verifier; raises KeyMaterialError/OSError."""
    ident = config.identity
    if ident.algorithm == keys.SECRET_ALGORITHM:
        assert ident.secret_file is not None
        secret = keys.load_secret(ident.secret_file)
        minter = Minter(service=config.service, algorithm="HS256", key=secret,
                        ttl=ident.token_ttl, trust_domain=config.trust_domain, clock=clock)
        verifier = Verifier(service=config.service, secret=secret, max_ttl=ident.max_token_ttl,
                            skew=ident.clock_skew, clock=clock)
        return minter, verifier
    assert ident.private_key_file is not None and ident.jwks_file is not None
    private = keys.load_private_key(ident.private_key_file, ident.algorithm)
    keyset = keys.load_keyset(ident.jwks_file)
    minter = Minter(service=config.service, algorithm=ident.algorithm, key=private,
                    ttl=ident.token_ttl, trust_domain=config.trust_domain, clock=clock)
    verifier = Verifier(service=config.service, keys=keyset, max_ttl=ident.max_token_ttl,
                        skew=ident.clock_skew, clock=clock)
    return minter, verifier


def check_keys(config: Config) -> list[str]:
    """Key and policy problems as `key.path: message` lines (for `check` and `run`)."""
    ident = config.identity
    problems = []
    loads: list[tuple[str, str | None, Callable[[str], object]]] = (
        [("secret_file", ident.secret_file, keys.load_secret)]
        if ident.algorithm == keys.SECRET_ALGORITHM
        else [
            ("private_key_file", ident.private_key_file,
             lambda path: keys.load_private_key(path, ident.algorithm)),
            ("jwks_file", ident.jwks_file, keys.load_keyset),
        ]
    )
    for key, path, load in loads:
        if path is None:
            continue
        try:
            load(path)
        except (ValueError, OSError) as exc:
            problems.append(f"identity.{key}: {exc}")
    try:
        Policy(rules=config.inbound.policy, public_paths=config.inbound.public_paths)
    except ValueError as exc:
        problems.append(f"inbound.policy: {exc}")
    for name, service in config.services.items():
        try:
            RouteTable(service.routes)
        except ValueError as exc:
            problems.append(f"services.{name}.routes: {exc}")
    return problems


def wire(config: Config, clock: Clock) -> Wiring:
    """Everything a config decides, built at once so a reload swaps it atomically."""
    minter, verifier = load_identity(config, clock)
    policy = Policy(rules=config.inbound.policy, public_paths=config.inbound.public_paths)
    targets = {
        name: Target(service=service, routes=RouteTable(service.routes))
        for name, service in config.services.items()
    }
    own = config.services.get(config.service)
    own_routes = RouteTable(own.routes if own is not None else ())
    hosts = set(LOOPBACK_NAMES)
    hosts.add(config.listen.outbound[0])
    return Wiring(
        config=config, minter=minter, verifier=verifier, policy=policy, targets=targets,
        own_routes=own_routes, local_hosts=frozenset(h.lower() for h in hosts),
    )
