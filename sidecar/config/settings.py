"""The typed, frozen config tree. `loader.py` builds it from YAML; nothing else does.

Durations are float seconds, sizes are int bytes. Every layer factory takes
the piece of this tree it needs. Each default is written here and only here:
the loader reads a missing key's value from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.names import TLS_DISABLED


@dataclass(frozen=True, slots=True)
class Listen:
    outbound: tuple[str, int] = ("127.0.0.1", 15001)
    inbound: tuple[str, int] = ("0.0.0.0", 15006)
    admin: tuple[str, int] = ("127.0.0.1", 15000)


@dataclass(frozen=True, slots=True)
class Identity:
    algorithm: str = "EdDSA"  # one of names.ALGORITHMS
    private_key_file: str | None = None
    secret_file: str | None = None
    jwks_file: str | None = None
    token_ttl: float = 60.0
    max_token_ttl: float = 300.0
    clock_skew: float = 30.0


@dataclass(frozen=True, slots=True)
class PolicyRule:
    sources: tuple[str, ...]  # `from`; "*" allows every verified service
    methods: tuple[str, ...] | None = None  # None: every method
    paths: tuple[str, ...] | None = None  # None: every path


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up (it starts full)."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a bucket needs a positive rate and a burst of at least 1")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One `inbound.rate_limits` rule: one bucket for all its calls, or one per caller.

    It applies to the calls it matches (`from`, `methods`, `paths`; None
    matches all); every rule that matches a call must admit it.
    """

    total: Bucket | None = None
    per_caller: Bucket | None = None
    sources: tuple[str, ...] | None = None  # `from`; "anonymous" names calls without a token
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    app: str = "http://127.0.0.1:8000"
    app_health_path: str | None = None
    public_paths: tuple[str, ...] = ()
    policy: tuple[PolicyRule, ...] | None = None  # None: any verified mesh service
    max_in_flight: int = 1000  # calls at the app at once; more: 503 overloaded
    rate_limits: tuple[RateLimit, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_line: int = 8 * 1024
    max_headers: int = 100
    max_request_body: int = 10 * 1024 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.025
    max: float = 1.0


@dataclass(frozen=True, slots=True)
class RetryBudget:
    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    per_try_timeout: float = 3.0
    backoff: Backoff = field(default_factory=Backoff)
    retry_on: frozenset[str] = frozenset(
        {"connect-failure", "reset", "per-try-timeout", "502", "503", "504"}
    )
    idempotent_methods: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
    budget: RetryBudget = field(default_factory=RetryBudget)
    max_body: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    recovery_timeout: float = 30.0
    half_open_max_calls: int = 1


@dataclass(frozen=True, slots=True)
class BulkheadPolicy:
    max_concurrent: int = 100
    max_pending: int = 100


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejected_percent: int = 50
    # Not in SPEC: Envoy's max_ejection_time. An ejection lasts at most this
    # long (or base_ejection, whichever is longer), however often it recurs.
    max_ejection: float = 300.0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/healthz"
    interval: float = 10.0
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Everything `defaults` holds; each service inherits it and may override any part."""

    timeout: float = 10.0
    connect_timeout: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    bulkhead: BulkheadPolicy = field(default_factory=BulkheadPolicy)
    outlier_detection: OutlierPolicy = field(default_factory=OutlierPolicy)
    health_check: HealthCheck | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("timeout and connect_timeout must be positive")


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    endpoints: tuple[str, ...]
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    routes: tuple[str, ...] = ()
    mesh: bool = True
    ca_file: str | None = None  # outside the mesh: the CAs an https:// endpoint must chain to


@dataclass(frozen=True, slots=True)
class Tracing:
    exporter: str = "none"  # one of names.EXPORTERS
    protocol: str = "http/protobuf"  # one of names.PROTOCOLS
    endpoint: str | None = None
    sample_ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class AuditShip:
    """`audit.ship`: every audit record, in order and in batches, to a collector service."""

    service: str
    path: str = "/audit/records"
    batch: int = 100
    interval: float = 1.0


@dataclass(frozen=True, slots=True)
class Audit:
    path: str | None = None
    ship: AuditShip | None = None


@dataclass(frozen=True, slots=True)
class Workflows:
    """`workflows`: sagas and fan-out on the outbound port; absent, the API is off.

    `redelivery` spaces the tries of a delivery or compensation once the
    service's `retry.attempts` are spent; `give_up_after` that first failure,
    a delivery is dead and a compensation `failed`.
    """

    store: str = "sqlite:///var/lib/sidecar/workflows.db"
    max_steps: int = 20
    retention: float = 7 * 86400.0
    redelivery: Backoff = field(default_factory=lambda: Backoff(base=1.0, max=60.0))
    give_up_after: float = 3600.0


@dataclass(frozen=True, slots=True)
class TLS:
    """`tls`: mutual TLS between sidecars, with this service's certificate."""

    mode: str = TLS_DISABLED  # one of names.TLS_MODES
    ca_file: str | None = None  # the mesh CA bundle; may hold old and new CA in a rotation
    cert_file: str | None = None
    key_file: str | None = None
    expiry_warning: float = 30 * 86400.0  # warn this long before the certificate expires

    @property
    def enabled(self) -> bool:
        return self.mode != TLS_DISABLED


@dataclass(frozen=True, slots=True)
class Config:
    service: str
    identity: Identity
    trust_domain: str | None = None
    listen: Listen = field(default_factory=Listen)
    drain_timeout: float = 10.0
    inbound: Inbound = field(default_factory=Inbound)
    limits: Limits = field(default_factory=Limits)
    defaults: ServicePolicy = field(default_factory=ServicePolicy)
    services: dict[str, Service] = field(default_factory=dict)
    tracing: Tracing = field(default_factory=Tracing)
    audit: Audit = field(default_factory=Audit)
    workflows: Workflows | None = None
    tls: TLS = field(default_factory=TLS)
    source_file: str | None = None
