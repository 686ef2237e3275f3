"""Loads the YAML config into the frozen tree of `settings.py`.

Every problem is collected with its key path (`services.billing.retry.attempts:
must be at least 1`) and reported together; unknown keys are errors, because
a typo must never silently turn a protection off.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from sidecar import names, paths
from sidecar.config import settings as s
from sidecar.config.units import parse_duration, parse_rate, parse_size

T = TypeVar("T")

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE_VAR = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
# PyYAML fails in more ways than YAMLError: `2001-02-30` is a ValueError, a
# bad `!!timestamp` an AttributeError, 5000 digits a ValueError, deep nesting
# a RecursionError. Each is a config that is not valid YAML.
_YAML_FAILURES = (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError)
RETRY_CONDITIONS = frozenset({"connect-failure", "reset", "per-try-timeout"})
SERVICE_KEYS = frozenset({"endpoints", "routes", "mesh", "ca_file"})


class ConfigError(Exception):
    """The config is invalid; `errors` holds every problem as `key.path: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path or '(top)'}: {message}")


def load(path: str | Path, *, environ: Mapping[str, str] | None = None) -> s.Config:
    """Read, substitute and validate a config file; raise ConfigError with every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {file}: {exc.strerror or exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except _YAML_FAILURES as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"(file): not valid YAML{where}"]) from None
    return parse(raw, base_dir=file.parent, environ=environ, source_file=str(file))


def parse(
    raw: Any,
    *,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    source_file: str | None = None,
) -> s.Config:
    """Build the config tree from a parsed mapping."""
    errors = _Errors()
    env = os.environ if environ is None else environ
    try:
        raw = _substitute(raw, "", env, errors)
    except RecursionError:
        # YAML aliases can make a list that holds itself (`&a [*a]`).
        raise ConfigError(["(top): the config nests too deeply or refers to itself"]) from None
    if errors.items:
        # A missing variable would also fail the value's own check: report the cause only.
        raise ConfigError(errors.items)
    if not isinstance(raw, dict):
        raise ConfigError(["(top): the config must be a mapping"])
    config = _Builder(errors, base_dir or Path.cwd()).config(raw)
    if errors.items:
        raise ConfigError(errors.items)
    assert config is not None
    return replace(config, source_file=source_file)


def _substitute(value: Any, path: str, env: Mapping[str, str], errors: _Errors) -> Any:
    if isinstance(value, str) and _WHOLE_VAR.match(value) and value[2:-1] in env:
        # `attempts: ${N}` is a number, `mesh: ${M}` a boolean, as YAML would read them.
        typed = _scalar(env[value[2:-1]])
        if isinstance(typed, bool | int | float):
            return typed
    if isinstance(value, str):
        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group(1)
            if name not in env:
                errors.add(path, f"environment variable {name} is not set")
                return ""
            return env[name]

        return _VAR.sub(one, value)
    if isinstance(value, dict):
        return {k: _substitute(v, _join(path, str(k)), env, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{path}[{i}]", env, errors) for i, v in enumerate(value)]
    return value


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except _YAML_FAILURES:
        return text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Builder:
    """Turns one raw mapping into settings, recording problems instead of stopping."""

    def __init__(self, errors: _Errors, base_dir: Path) -> None:
        self.errors = errors
        self.base_dir = base_dir

    # -- generic readers -------------------------------------------------

    def mapping(self, raw: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.errors.add(path, "must be a mapping")
            return {}
        for key in raw:
            if key not in allowed:
                self.errors.add(_join(path, str(key)), "unknown key")
        return {k: v for k, v in raw.items() if k in allowed}

    def read(self, raw: dict[str, Any], key: str, path: str, convert: Callable[[Any], T],
             default: T) -> T:
        if key not in raw:
            return default
        try:
            return convert(raw[key])
        except _ItemError as exc:
            self.errors.add(f"{_join(path, key)}[{exc.index}]", str(exc))
            return default
        except (ValueError, TypeError) as exc:
            self.errors.add(_join(path, key), str(exc))
            return default

    def file(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file path")
        resolved = Path(value) if os.path.isabs(value) else self.base_dir / value
        if not resolved.is_file():
            raise ValueError(f"file not found: {resolved}")
        return str(resolved)

    # -- sections --------------------------------------------------------

    def config(self, raw: dict[str, Any]) -> s.Config | None:
        raw = self.mapping(raw, "", {
            "service", "trust_domain", "listen", "drain_timeout", "identity", "inbound",
            "limits", "defaults", "services", "tracing", "audit", "workflows", "tls",
        })
        if "service" not in raw:
            self.errors.add("service", "is required")
        base = s.Config(service="", identity=s.Identity())
        service = self.read(raw, "service", "", _service_name, base.service)
        trust_domain = self.read(raw, "trust_domain", "", _trust_domain, base.trust_domain)
        defaults = self.service_policy(raw.get("defaults"), "defaults", base.defaults)
        services = self.services(raw.get("services"), defaults)
        audit = self.audit(raw.get("audit"))
        workflows = self.workflows(raw["workflows"]) if "workflows" in raw else base.workflows
        self.check_ship(audit, services, workflows)
        tls = self.tls(raw.get("tls"))
        if tls.enabled and trust_domain is None:
            self.errors.add("trust_domain", f"is required with tls.mode {tls.mode}: SPIFFE IDs "
                            "are spiffe://<trust_domain>/<service>")
        return s.Config(
            service=service,
            trust_domain=trust_domain,
            listen=self.listen(raw.get("listen")),
            drain_timeout=self.read(raw, "drain_timeout", "", _duration(), base.drain_timeout),
            identity=self.identity(raw.get("identity")),
            inbound=self.inbound(raw.get("inbound")),
            limits=self.limits(raw.get("limits")),
            defaults=defaults,
            services=services,
            tracing=self.tracing(raw.get("tracing")),
            audit=audit,
            workflows=workflows,
            tls=tls,
        )

    def listen(self, raw: Any) -> s.Listen:
        raw = self.mapping(raw, "listen", {"outbound", "inbound", "admin"})
        base = s.Listen()
        return s.Listen(
            outbound=self.read(raw, "outbound", "listen", parse_address, base.outbound),
            inbound=self.read(raw, "inbound", "listen", parse_address, base.inbound),
            admin=self.read(raw, "admin", "listen", parse_address, base.admin),
        )

    def identity(self, raw: Any) -> s.Identity:
        path = "identity"
        if raw is None:
            self.errors.add(path, "is required (a key pair or a shared secret)")
            return s.Identity()
        raw = self.mapping(raw, path, {
            "algorithm", "private_key_file", "secret_file", "jwks_file", "token_ttl",
            "max_token_ttl", "clock_skew",
        })
        base = s.Identity()
        algorithm = self.read(raw, "algorithm", path, _choice(names.ALGORITHMS), base.algorithm)
        identity = s.Identity(
            algorithm=algorithm,
            private_key_file=self.read(raw, "private_key_file", path, self.file,
                                       base.private_key_file),
            secret_file=self.read(raw, "secret_file", path, self.file, base.secret_file),
            jwks_file=self.read(raw, "jwks_file", path, self.file, base.jwks_file),
            token_ttl=self.read(raw, "token_ttl", path, _duration(positive=True), base.token_ttl),
            max_token_ttl=self.read(raw, "max_token_ttl", path, _duration(positive=True),
                                    base.max_token_ttl),
            clock_skew=self.read(raw, "clock_skew", path, _duration(), base.clock_skew),
        )
        if algorithm == names.SECRET_ALGORITHM:
            if "secret_file" not in raw:
                self.errors.add(_join(path, "secret_file"), f"is required with {algorithm}")
            for key in ("private_key_file", "jwks_file"):
                if key in raw:
                    self.errors.add(_join(path, key),
                                    f"is not used with {algorithm} (secret_file is)")
        else:
            for key in ("private_key_file", "jwks_file"):
                if key not in raw:
                    self.errors.add(_join(path, key), f"is required with {algorithm}")
            if "secret_file" in raw:
                self.errors.add(_join(path, "secret_file"),
                                f"is only for {names.SECRET_ALGORITHM}")
        if identity.token_ttl > identity.max_token_ttl:
            self.errors.add(_join(path, "token_ttl"), "must not exceed max_token_ttl")
        return identity

    def inbound(self, raw: Any) -> s.Inbound:
        path = "inbound"
        raw = self.mapping(raw, path, {"app", "app_health_path", "public_paths", "policy",
                                       "max_in_flight", "rate_limits"})
        base = s.Inbound()
        policy = base.policy
        if "policy" in raw and raw["policy"] is not None:
            policy = self.policy(raw["policy"], _join(path, "policy"))
        rate_limits = base.rate_limits
        if raw.get("rate_limits") is not None:
            rate_limits = self.rate_limits(raw["rate_limits"], _join(path, "rate_limits"))
        return s.Inbound(
            app=self.read(raw, "app", path, _app_url, base.app),
            app_health_path=self.read(raw, "app_health_path", path, _path_pattern,
                                      base.app_health_path),
            public_paths=self.read(raw, "public_paths", path, _list_of(_path_pattern),
                                   base.public_paths),
            policy=policy,
            max_in_flight=self.read(raw, "max_in_flight", path, _int(1), base.max_in_flight),
            rate_limits=rate_limits,
        )

    def policy(self, raw: Any, path: str) -> tuple[s.PolicyRule, ...]:
        if not isinstance(raw, list):
            self.errors.add(path, "must be a list of rules")
            return ()
        rules = []
        base = s.PolicyRule(sources=())
        for i, item in enumerate(raw):
            where = f"{path}[{i}]"
            item = self.mapping(item, where, {"from", "methods", "paths"})
            if "from" not in item:
                self.errors.add(_join(where, "from"),
                                f"is required (service names or '{names.ANY_SERVICE}')")
            rules.append(s.PolicyRule(
                sources=self.read(item, "from", where, _list_of(_source), base.sources),
                methods=self.read(item, "methods", where, _list_of(_method), base.methods),
                paths=self.read(item, "paths", where, _list_of(_path_pattern), base.paths),
            ))
        return tuple(rules)

    def rate_limits(self, raw: Any, path: str) -> tuple[s.RateLimit, ...]:
        if not isinstance(raw, list):
            self.errors.add(path, "must be a list of rules")
            return ()
        rules = []
        base = s.RateLimit()
        for i, item in enumerate(raw):
            where = f"{path}[{i}]"
            item = self.mapping(item, where, {"total", "per_caller", "from", "methods", "paths"})
            kinds = [kind for kind in ("total", "per_caller") if kind in item]
            if len(kinds) != 1:
                self.errors.add(where, "needs exactly one of total or per_caller")
            rules.append(s.RateLimit(
                total=self.bucket(item.get("total"), _join(where, "total")),
                per_caller=self.bucket(item.get("per_caller"), _join(where, "per_caller")),
                sources=self.read(item, "from", where, _list_of(_service_name), base.sources),
                methods=self.read(item, "methods", where, _list_of(_method), base.methods),
                paths=self.read(item, "paths", where, _list_of(_path_pattern), base.paths),
            ))
        return tuple(rules)

    def bucket(self, raw: Any, path: str) -> s.Bucket | None:
        if raw is None:
            return None
        raw = self.mapping(raw, path, {"rate", "burst"})
        for key in ("rate", "burst"):
            if key not in raw:
                self.errors.add(_join(path, key), "is required")
        rate = self.read(raw, "rate", path, parse_rate, 0.0)
        burst = self.read(raw, "burst", path, _int(1), 0)
        return s.Bucket(rate=rate, burst=burst) if rate > 0 and burst >= 1 else None

    def tls(self, raw: Any) -> s.TLS:
        path = "tls"
        raw = self.mapping(raw, path, {"mode", "ca_file", "cert_file", "key_file",
                                       "expiry_warning"})
        base = s.TLS()
        tls = s.TLS(
            mode=self.read(raw, "mode", path, _choice(names.TLS_MODES), base.mode),
            ca_file=self.read(raw, "ca_file", path, self.file, base.ca_file),
            cert_file=self.read(raw, "cert_file", path, self.file, base.cert_file),
            key_file=self.read(raw, "key_file", path, self.file, base.key_file),
            expiry_warning=self.read(raw, "expiry_warning", path, _duration(),
                                     base.expiry_warning),
        )
        if tls.enabled:
            for key in ("ca_file", "cert_file", "key_file"):
                if key not in raw:
                    self.errors.add(_join(path, key), f"is required with mode {tls.mode}")
        return tls

    def limits(self, raw: Any) -> s.Limits:
        path = "limits"
        raw = self.mapping(raw, path, {
            "max_header_line", "max_headers", "max_request_body", "header_timeout",
            "idle_timeout",
        })
        base = s.Limits()
        return s.Limits(
            max_header_line=self.read(raw, "max_header_line", path, _size(1), base.max_header_line),
            max_headers=self.read(raw, "max_headers", path, _int(1), base.max_headers),
            max_request_body=self.read(raw, "max_request_body", path, _size(0),
                                       base.max_request_body),
            header_timeout=self.read(raw, "header_timeout", path, _duration(positive=True),
                                     base.header_timeout),
            idle_timeout=self.read(raw, "idle_timeout", path, _duration(positive=True),
                                   base.idle_timeout),
        )

    def service_policy(self, raw: Any, path: str, base: s.ServicePolicy,
                       extra: frozenset[str] = frozenset()) -> s.ServicePolicy:
        raw = self.mapping(raw, path, {
            "timeout", "connect_timeout", "retry", "circuit_breaker", "bulkhead",
            "outlier_detection", "health_check", *extra,
        })
        health = base.health_check
        if "health_check" in raw:
            health = self.health_check(raw["health_check"], _join(path, "health_check"),
                                       base.health_check)
        return s.ServicePolicy(
            timeout=self.read(raw, "timeout", path, _duration(positive=True), base.timeout),
            connect_timeout=self.read(raw, "connect_timeout", path, _duration(positive=True),
                                      base.connect_timeout),
            retry=self.retry(raw.get("retry"), _join(path, "retry"), base.retry),
            circuit_breaker=self.breaker(raw.get("circuit_breaker"),
                                         _join(path, "circuit_breaker"), base.circuit_breaker),
            bulkhead=self.bulkhead(raw.get("bulkhead"), _join(path, "bulkhead"), base.bulkhead),
            outlier_detection=self.outlier(raw.get("outlier_detection"),
                                           _join(path, "outlier_detection"),
                                           base.outlier_detection),
            health_check=health,
        )

    def retry(self, raw: Any, path: str, base: s.RetryPolicy) -> s.RetryPolicy:
        raw = self.mapping(raw, path, {
            "attempts", "per_try_timeout", "backoff", "retry_on", "idempotent_methods",
            "budget", "max_body",
        })
        backoff_raw = self.mapping(raw.get("backoff"), _join(path, "backoff"), {"base", "max"})
        bpath = _join(path, "backoff")
        backoff = s.Backoff(
            base=self.read(backoff_raw, "base", bpath, _duration(), base.backoff.base),
            max=self.read(backoff_raw, "max", bpath, _duration(), base.backoff.max),
        )
        if backoff.max < backoff.base:
            self.errors.add(_join(bpath, "max"), "must not be less than base")
        budget_path = _join(path, "budget")
        budget_raw = self.mapping(raw.get("budget"), budget_path,
                                  {"ratio", "min_per_second", "window"})
        budget = s.RetryBudget(
            ratio=self.read(budget_raw, "ratio", budget_path, _number(0, 1), base.budget.ratio),
            min_per_second=self.read(budget_raw, "min_per_second", budget_path, _number(0),
                                     base.budget.min_per_second),
            window=self.read(budget_raw, "window", budget_path, _duration(positive=True),
                             base.budget.window),
        )
        return s.RetryPolicy(
            attempts=self.read(raw, "attempts", path, _int(1, 10), base.attempts),
            per_try_timeout=self.read(raw, "per_try_timeout", path, _duration(positive=True),
                                      base.per_try_timeout),
            backoff=backoff,
            retry_on=self.read(raw, "retry_on", path, _retry_on, base.retry_on),
            idempotent_methods=self.read(raw, "idempotent_methods", path,
                                         lambda v: frozenset(_items(v, _method)),
                                         base.idempotent_methods),
            budget=budget,
            max_body=self.read(raw, "max_body", path, _size(0), base.max_body),
        )

    def breaker(self, raw: Any, path: str, base: s.BreakerPolicy) -> s.BreakerPolicy:
        raw = self.mapping(raw, path,
                           {"failure_threshold", "recovery_timeout", "half_open_max_calls"})
        return s.BreakerPolicy(
            failure_threshold=self.read(raw, "failure_threshold", path, _int(1),
                                        base.failure_threshold),
            recovery_timeout=self.read(raw, "recovery_timeout", path, _duration(positive=True),
                                       base.recovery_timeout),
            half_open_max_calls=self.read(raw, "half_open_max_calls", path, _int(1),
                                          base.half_open_max_calls),
        )

    def bulkhead(self, raw: Any, path: str, base: s.BulkheadPolicy) -> s.BulkheadPolicy:
        raw = self.mapping(raw, path, {"max_concurrent", "max_pending"})
        return s.BulkheadPolicy(
            max_concurrent=self.read(raw, "max_concurrent", path, _int(1), base.max_concurrent),
            max_pending=self.read(raw, "max_pending", path, _int(0), base.max_pending),
        )

    def outlier(self, raw: Any, path: str, base: s.OutlierPolicy) -> s.OutlierPolicy:
        raw = self.mapping(raw, path, {"consecutive_failures", "base_ejection",
                                       "max_ejected_percent", "max_ejection"})
        return s.OutlierPolicy(
            consecutive_failures=self.read(raw, "consecutive_failures", path, _int(1),
                                           base.consecutive_failures),
            base_ejection=self.read(raw, "base_ejection", path, _duration(positive=True),
                                    base.base_ejection),
            max_ejected_percent=self.read(raw, "max_ejected_percent", path, _int(0, 100),
                                          base.max_ejected_percent),
            max_ejection=self.read(raw, "max_ejection", path, _duration(positive=True),
                                   base.max_ejection),
        )

    def health_check(self, raw: Any, path: str,
                     base: s.HealthCheck | None) -> s.HealthCheck | None:
        if raw is None:
            return None
        raw = self.mapping(raw, path, {"path", "interval", "timeout"})
        start = base or s.HealthCheck()
        return s.HealthCheck(
            path=self.read(raw, "path", path, _path_pattern, start.path),
            interval=self.read(raw, "interval", path, _duration(positive=True), start.interval),
            timeout=self.read(raw, "timeout", path, _duration(positive=True), start.timeout),
        )

    def services(self, raw: Any, defaults: s.ServicePolicy) -> dict[str, s.Service]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.errors.add("services", "must be a mapping of service name to settings")
            return {}
        out: dict[str, s.Service] = {}
        for name, body in raw.items():
            path = _join("services", str(name))
            try:
                key = _service_name(name)
            except ValueError as exc:
                self.errors.add(path, str(exc))
                continue
            if key in out:
                self.errors.add(path, "is listed twice (names are case-insensitive)")
                continue
            if not isinstance(body, dict):
                self.errors.add(path, "must be a mapping with endpoints")
                continue
            # Each service starts from the parsed defaults and overrides any part of them.
            policy = self.service_policy(body, path, defaults, extra=SERVICE_KEYS)
            if "endpoints" not in body:
                self.errors.add(_join(path, "endpoints"), "is required")
            base = s.Service(name=key, endpoints=())
            out[key] = s.Service(
                name=key,
                endpoints=self.read(body, "endpoints", path, _endpoints, base.endpoints),
                policy=policy,
                routes=self.read(body, "routes", path, _list_of(_route_template), base.routes),
                mesh=self.read(body, "mesh", path, _bool, base.mesh),
                ca_file=self.read(body, "ca_file", path, self.file, base.ca_file),
            )
            if out[key].ca_file is not None:
                self.check_ca_file(out[key], _join(path, "ca_file"))
        return out

    def check_ca_file(self, service: s.Service, path: str) -> None:
        """A service's own `ca_file` is for https:// endpoints outside the mesh only."""
        if service.mesh:
            self.errors.add(path, "is only for services outside the mesh (mesh: false); "
                            "mesh services are checked against tls.ca_file")
        elif not any(url.startswith("https://") for url in service.endpoints):
            self.errors.add(path, "is used only with https:// endpoints")

    def tracing(self, raw: Any) -> s.Tracing:
        path = "tracing"
        raw = self.mapping(raw, path, {"exporter", "protocol", "endpoint", "sample_ratio"})
        base = s.Tracing()
        return s.Tracing(
            exporter=self.read(raw, "exporter", path, _choice(names.EXPORTERS), base.exporter),
            protocol=self.read(raw, "protocol", path, _choice(names.PROTOCOLS), base.protocol),
            endpoint=self.read(raw, "endpoint", path, _http_url, base.endpoint),
            sample_ratio=self.read(raw, "sample_ratio", path, _number(0, 1), base.sample_ratio),
        )

    def audit(self, raw: Any) -> s.Audit:
        raw = self.mapping(raw, "audit", {"path", "ship"})
        base = s.Audit()
        ship = base.ship
        if raw.get("ship") is not None:
            path = "audit.ship"
            ship_raw = self.mapping(raw["ship"], path, {"service", "path", "batch", "interval"})
            if "service" not in ship_raw:
                self.errors.add(_join(path, "service"), "is required (the collector service)")
            start = s.AuditShip(service="")
            ship = s.AuditShip(
                service=self.read(ship_raw, "service", path, _service_name, start.service),
                path=self.read(ship_raw, "path", path, _plain_path, start.path),
                batch=self.read(ship_raw, "batch", path, _int(1, 10_000), start.batch),
                interval=self.read(ship_raw, "interval", path, _duration(positive=True),
                                   start.interval),
            )
        return s.Audit(path=self.read(raw, "path", "audit", _non_empty_str, base.path),
                       ship=ship)

    def workflows(self, raw: Any) -> s.Workflows:
        path = "workflows"
        raw = self.mapping(raw, path, {"store", "max_steps", "retention", "redelivery",
                                       "give_up_after"})
        base = s.Workflows()
        rpath = _join(path, "redelivery")
        redelivery_raw = self.mapping(raw.get("redelivery"), rpath, {"base", "max"})
        redelivery = s.Backoff(
            base=self.read(redelivery_raw, "base", rpath, _duration(positive=True),
                           base.redelivery.base),
            max=self.read(redelivery_raw, "max", rpath, _duration(positive=True),
                          base.redelivery.max),
        )
        if redelivery.max < redelivery.base:
            self.errors.add(_join(rpath, "max"), "must not be less than base")
        return s.Workflows(
            store=self.read(raw, "store", path, self.store_url, base.store),
            max_steps=self.read(raw, "max_steps", path, _int(1, 1000), base.max_steps),
            retention=self.read(raw, "retention", path, _duration(positive=True),
                                base.retention),
            redelivery=redelivery,
            give_up_after=self.read(raw, "give_up_after", path, _duration(positive=True),
                                    base.give_up_after),
        )

    def store_url(self, value: Any) -> str:
        """`sqlite://` and a file path (relative to the config's folder), or a PostgreSQL URL."""
        if not isinstance(value, str):
            raise ValueError("must be sqlite://PATH or postgresql://user@host/db")
        scheme, sep, rest = value.partition("://")
        if sep and scheme == "sqlite" and rest and not rest.endswith("/"):
            file = Path(rest)
            return "sqlite://" + str(file if file.is_absolute() else self.base_dir / file)
        if sep and scheme in ("postgresql", "postgres") and urlsplit(value).hostname:
            return value
        raise ValueError("must be sqlite://PATH or postgresql://user@host/db")

    def check_ship(self, audit: s.Audit, services: dict[str, s.Service],
                   workflows: s.Workflows | None) -> None:
        """`audit.ship` needs a collector it can route to, a file to read and a store."""
        ship = audit.ship
        if ship is None:
            return
        if ship.service and ship.service not in services:
            self.errors.add("audit.ship.service", "must be one of `services`")
        if audit.path is None:
            self.errors.add("audit.ship", "needs audit.path: the records are read from it")
        if workflows is None:
            self.errors.add("audit.ship", "needs a `workflows` section: its cursor is kept "
                                          "in the workflow store")


# -- value converters: raise ValueError with a message that names the rule ---------


def _service_name(value: Any) -> str:
    if value == names.RESERVED_SERVICE:
        raise ValueError(f"'{names.RESERVED_SERVICE}' is reserved for the sidecar's own API")
    if not names.is_service_name(value):
        raise ValueError(f"must be a service name: {names.SERVICE_NAME_RULE}")
    return str(value).lower()


def _trust_domain(value: Any) -> str:
    if not names.is_trust_domain(value):
        raise ValueError(f"must be {names.TRUST_DOMAIN_RULE}")
    return str(value).lower()


def _source(value: Any) -> str:
    if value == names.ANY_SERVICE:
        return names.ANY_SERVICE
    return _service_name(value)


def _method(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in names.HTTP_METHODS:
        raise ValueError("must be an HTTP method such as GET or POST")
    return value.upper()


def _path_pattern(value: Any) -> str:
    paths.check_pattern(value)
    return str(value)


def _plain_path(value: Any) -> str:
    if not isinstance(value, str) or "*" in value or "{" in value or "?" in value:
        raise ValueError("must be a plain path such as /audit/records")
    try:
        normal = paths.normalise(value)
    except paths.BadPath as exc:
        raise ValueError(f"must be a plain path such as /audit/records ({exc})") from None
    if normal != value:
        raise ValueError("must be a plain path such as /audit/records (already normalised)")
    return value


def _route_template(value: Any) -> str:
    paths.check_template(value)
    return str(value)


class _ItemError(ValueError):
    """A list item is invalid; `index` names it in the key path."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _items(value: Any, convert: Callable[[Any], T]) -> list[T]:
    if not isinstance(value, list):
        raise ValueError("must be a list")
    out = []
    for index, item in enumerate(value):
        try:
            out.append(convert(item))
        except ValueError as exc:
            raise _ItemError(index, str(exc)) from None
    return out


def _list_of(convert: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
    def read(value: Any) -> tuple[str, ...]:
        return tuple(_items(value, convert))

    return read


def _retry_condition(item: Any) -> str:
    text = str(item)
    if text in RETRY_CONDITIONS or re.fullmatch(r"5\d\d", text):
        return text
    raise ValueError("must be connect-failure, reset, per-try-timeout or a 5xx status code")


def _retry_on(value: Any) -> frozenset[str]:
    return frozenset(_items(value, _retry_condition))


def _duration(*, positive: bool = False) -> Callable[[Any], float]:
    def read(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError("must be greater than zero")
        return seconds

    return read


def _size(minimum: int) -> Callable[[Any], int]:
    def read(value: Any) -> int:
        size = parse_size(value)
        if size < minimum:
            raise ValueError(f"must be at least {minimum} bytes")
        return size

    return read


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def read(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return value

    return read


def _number(minimum: float, maximum: float | None = None) -> Callable[[Any], float]:
    def read(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        # Before the comparisons, which NaN would pass, and before float(), which 10**400 fails.
        if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > 1e15:
            raise ValueError("must be a finite number of at most 1e15")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return float(value)

    return read


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(value)

    return read


def _non_empty_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def parse_address(value: Any) -> tuple[str, int]:
    """`host:port` (an IP address or localhost) to `(host, port)`; ValueError if it is not."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("must be host:port, such as 127.0.0.1:15001")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError("must end in a port from 0 to 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError("host must be an IP address or localhost") from None
    return host, int(port_text)


def _http_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


def _endpoint(value: Any) -> str:
    url = _http_url(value)
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError("must be scheme://host:port only, with no path or query")
    return url


def _endpoints(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of URLs")
    return tuple(_items(value, _endpoint))


def _app_url(value: Any) -> str:
    url = _http_url(value)
    host = urlsplit(url).hostname or ""
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not loopback:
        raise ValueError("the app must be on loopback (127.0.0.1 or localhost)")
    return url


# -- the effective config, for /admin/config ---------------------------------------

SECRET_KEYS = frozenset({"private_key_file", "secret_file"})


def redacted(config: s.Config) -> dict[str, Any]:
    """The effective config as plain data, with secrets and key material replaced."""

    def plain(value: Any) -> Any:
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, frozenset):
            return sorted(value)
        return value

    doc = plain(config)
    for key in SECRET_KEYS:
        if doc["identity"].get(key):
            doc["identity"][key] = "[redacted]"
    if doc["workflows"] is not None:
        doc["workflows"]["store"] = _without_password(doc["workflows"]["store"])
    if doc["tls"].get("key_file"):
        doc["tls"]["key_file"] = "[redacted]"
    return doc


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:[redacted]@{host}").geturl()


