"""What the stacks are built from, in one place.

`Shared` lives as long as the process; `Wiring` is everything one config
decides (keys, policy, routes), built at once by `wire` so a reload swaps it
whole. `check_keys` reports key and policy problems for `check` and `run`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from sidecar.audit.log import AuditLog
from sidecar.clock import Clock
from sidecar.config.settings import Config, Service
from sidecar.identity import keys
from sidecar.identity.tokens import Minter, Verifier
from sidecar.inbound import stack as inbound_stack
from sidecar.inbound.overload import InFlight
from sidecar.inbound.policy import Policy
from sidecar.inbound.ratelimit import RateLimits
from sidecar.outbound import stack as outbound_stack
from sidecar.paths import RouteTable
from sidecar.resilience.breaker import Breakers
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.bulkhead import Bulkheads
from sidecar.resilience.pools import Pools
from sidecar.stack import Handler, Target
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing
from sidecar.tls import check as tls_check
from sidecar.tls.contexts import outside_context
from sidecar.tls.material import MeshTLS
from sidecar.workflows import api as workflow_api
from sidecar.workflows.engine import Engine

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
    rate_limits: RateLimits
    in_flight: InFlight  # calls at the app now, for inbound.max_in_flight
    tls: MeshTLS | None = None  # the current certificates, when TLS is on
    workflows: Engine | None = None  # with a `workflows` section


@dataclass(frozen=True, slots=True)
class Wiring:
    """Built from one config; a reload builds a new one and swaps it in whole.

    `outbound` and `inbound` are the two stacks, built from `Shared` and this
    config's keys, policy and targets.
    """

    config: Config
    outbound: Handler
    inbound: Handler


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


def check_keys(config: Config, *, dates: bool = True) -> list[str]:
    """Key, certificate and policy problems as `key.path: message` lines (for `check` and `run`).

    `dates=False` (for `run`) leaves out certificate validity: a sidecar with an
    expired certificate starts, not ready, so that new files bring it back.
    """
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
    problems += tls_check.problems(config.tls, service=config.service,
                                   trust_domain=config.trust_domain,
                                   now=datetime.datetime.now(datetime.UTC) if dates else None)
    for name, service in config.services.items():
        if service.ca_file is not None:
            try:
                outside_context(service.ca_file)
            except (ValueError, OSError) as exc:
                problems.append(f"services.{name}.ca_file: {type(exc).__name__}: not a CA file")
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


def app_target(config: Config) -> Target:
    """This service's app as the inbound stack's one target: `defaults` are its settings,
    and its routes are the ones `services` lists under this service's own name."""
    own = config.services.get(config.service)
    routes = own.routes if own is not None else ()
    app = Service(name=config.service, endpoints=(config.inbound.app.rstrip("/"),),
                  policy=config.defaults, routes=routes, mesh=False)
    return Target(service=app, routes=RouteTable(routes))


def wire(config: Config, shared: Shared) -> Wiring:
    """Everything a config decides, built at once so a reload swaps it atomically.

    Raises KeyMaterialError or OSError when keys cannot be loaded.
    """
    minter, verifier = load_identity(config, shared.clock)
    policy = Policy(rules=config.inbound.policy, public_paths=config.inbound.public_paths)
    targets = {
        name: Target(service=service, routes=RouteTable(service.routes))
        for name, service in config.services.items()
    }
    hosts = set(LOOPBACK_NAMES)
    hosts.add(config.listen.outbound[0])
    api = None
    if shared.workflows is not None and config.workflows is not None:
        api = workflow_api.handler(engine=shared.workflows, services=frozenset(targets),
                                   max_body=config.limits.max_request_body,
                                   max_steps=config.workflows.max_steps)
    # https:// services outside the mesh with CAs of their own.
    outside = {name: outside_context(service.ca_file)
               for name, service in config.services.items() if service.ca_file is not None}
    return Wiring(
        config=config,
        outbound=outbound_stack.build(
            clock=shared.clock, session=shared.session, audit_log=shared.audit,
            stats=shared.metrics, tracer=shared.tracing, bulkheads=shared.bulkheads,
            budgets=shared.budgets, breakers=shared.breakers, pools=shared.pools,
            mesh_tls=shared.tls, limits=config.limits,
            targets=targets, local_hosts=frozenset(h.lower() for h in hosts), minter=minter,
            api=api,
            outside_tls=outside,
        ),
        inbound=inbound_stack.build(
            clock=shared.clock, session=shared.session, audit_log=shared.audit,
            stats=shared.metrics, tracer=shared.tracing, rate_limits=shared.rate_limits,
            in_flight=shared.in_flight, limits=config.limits,
            service=config.service, verifier=verifier, policy=policy, app=app_target(config),
            tls_mode=config.tls.mode, trust_domain=config.trust_domain,
            max_in_flight=config.inbound.max_in_flight,
        ),
    )
