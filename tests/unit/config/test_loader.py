"""Config loading: the typed tree, ${VAR}, inheritance, and errors with key paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config import loader as config
from sidecar.config.settings import (
    Config,
    HealthCheck,
    Identity,
    Inbound,
    PolicyRule,
    Service,
    ServicePolicy,
)
from sidecar.identity import keys

SPEC_EXAMPLE = """
service: billing-engine
trust_domain: intelluxe.local
listen: {outbound: 127.0.0.1:15001, inbound: 0.0.0.0:15006, admin: 127.0.0.1:15000}
drain_timeout: 10s
identity:
  algorithm: EdDSA
  private_key_file: KEYS/billing-engine.pem
  jwks_file: KEYS/jwks.json
  token_ttl: 60s
  max_token_ttl: 300s
  clock_skew: 30s
inbound:
  app: http://127.0.0.1:8000
  app_health_path: /health
  public_paths: [/health]
  policy:
    - from: [healthcare-api]
      methods: [POST]
      paths: [/claims, "/claims/*"]
limits:
  max_header_line: 8KiB
  max_headers: 100
  max_request_body: 10MiB
  header_timeout: 10s
  idle_timeout: 60s
defaults:
  timeout: 10s
  connect_timeout: 1s
  retry:
    attempts: 3
    per_try_timeout: 3s
    backoff: {base: 25ms, max: 1s}
    retry_on: [connect-failure, reset, per-try-timeout, 502, 503, 504]
    idempotent_methods: [GET, HEAD, OPTIONS, PUT, DELETE]
    budget: {ratio: 0.2, min_per_second: 10, window: 10s}
    max_body: 64KiB
  circuit_breaker: {failure_threshold: 5, recovery_timeout: 30s, half_open_max_calls: 1}
  bulkhead: {max_concurrent: 100, max_pending: 100}
  outlier_detection: {consecutive_failures: 5, base_ejection: 30s, max_ejected_percent: 50}
  health_check: null
services:
  insurance-verification:
    endpoints: [http://insurance-verification:15006]
    routes: ["/patients/{id}/coverage"]
  compliance-monitor:
    endpoints: [http://compliance-monitor-1:15006, http://compliance-monitor-2:15006]
    timeout: 2s
  payer-gateway:
    endpoints: [https://payer.example.com]
    mesh: false
tracing:
  exporter: otlp
  protocol: http/protobuf
  endpoint: http://jaeger:4318
  sample_ratio: 1.0
audit:
  path: /var/log/sidecar/audit.jsonl
"""


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    keys.generate(service="billing-engine", out_dir=tmp_path)
    (tmp_path / "jwks.json").write_text(
        __import__("json").dumps(keys.merge_jwks([tmp_path]))
    )
    return tmp_path


def write(tmp_path: Path, text: str, key_dir: Path) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text.replace("KEYS", str(key_dir)))
    return path


def test_spec_example_loads_into_the_typed_tree(tmp_path: Path, key_dir: Path) -> None:
    cfg = config.load(write(tmp_path, SPEC_EXAMPLE, key_dir))
    assert cfg.service == "billing-engine"
    assert cfg.listen.inbound == ("0.0.0.0", 15006)
    assert cfg.limits.max_request_body == 10 * 1024 * 1024
    assert cfg.defaults.retry.backoff.base == pytest.approx(0.025)
    assert cfg.inbound.policy is not None
    assert cfg.inbound.policy[0].sources == ("healthcare-api",)
    compliance = cfg.services["compliance-monitor"]
    assert compliance.policy.timeout == 2.0
    assert compliance.policy.retry.attempts == 3  # inherited from defaults
    assert cfg.services["payer-gateway"].mesh is False
    assert cfg.services["insurance-verification"].routes == ("/patients/{id}/coverage",)
    assert cfg.defaults.outlier_detection.max_ejection == 300.0  # Envoy's default


def test_max_ejection_is_a_positive_duration(tmp_path: Path, key_dir: Path) -> None:
    doc = yaml.safe_load(SPEC_EXAMPLE.replace("KEYS", str(key_dir)))
    doc["defaults"]["outlier_detection"]["max_ejection"] = "2m"
    cfg = config.parse(doc)
    assert cfg.services["compliance-monitor"].policy.outlier_detection.max_ejection == 120.0
    doc["services"]["compliance-monitor"]["outlier_detection"] = {"max_ejection": "0s"}
    with pytest.raises(config.ConfigError) as caught:
        config.parse(doc)
    assert caught.value.errors[0].startswith(
        "services.compliance-monitor.outlier_detection.max_ejection:")


def test_service_overrides_any_part_of_defaults(tmp_path: Path, key_dir: Path) -> None:
    doc = yaml.safe_load(SPEC_EXAMPLE.replace("KEYS", str(key_dir)))
    doc["services"]["compliance-monitor"]["retry"] = {"attempts": 1}
    doc["services"]["compliance-monitor"]["bulkhead"] = {"max_pending": 0}
    cfg = config.parse(doc)
    retry = cfg.services["compliance-monitor"].policy.retry
    assert retry.attempts == 1
    assert retry.per_try_timeout == 3.0  # the rest of retry still comes from defaults
    assert cfg.services["compliance-monitor"].policy.bulkhead.max_pending == 0
    assert cfg.services["compliance-monitor"].policy.bulkhead.max_concurrent == 100


def test_every_error_is_reported_with_its_key_path(tmp_path: Path, key_dir: Path) -> None:
    doc = yaml.safe_load(SPEC_EXAMPLE.replace("KEYS", str(key_dir)))
    doc["limits"]["max_headres"] = 10
    doc["defaults"]["retry"]["attempts"] = 0
    doc["defaults"]["timeout"] = 10
    doc["services"]["compliance-monitor"]["endpoints"] = ["http://ok:15006", "ftp://x"]
    doc["inbound"]["policy"][0]["methods"] = ["POST", "FETCH"]
    doc["identity"]["jwks_file"] = "/nonexistent/jwks.json"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(doc)
    errors = "\n".join(caught.value.errors)
    assert "limits.max_headres: unknown key" in errors
    assert "defaults.retry.attempts:" in errors
    assert "defaults.timeout:" in errors
    # A bad list item is named by its index.
    assert "services.compliance-monitor.endpoints[1]:" in errors
    assert "inbound.policy[0].methods[1]:" in errors
    assert "identity.jwks_file: file not found" in errors
    assert len(caught.value.errors) >= 6


def test_env_substitution_and_literal_dollar(tmp_path: Path, key_dir: Path) -> None:
    text = SPEC_EXAMPLE.replace("service: billing-engine", "service: ${SVC}").replace(
        "audit:\n  path: /var/log/sidecar/audit.jsonl", "audit:\n  path: /tmp/$${HOME}/a"
    )
    cfg = config.load(write(tmp_path, text, key_dir), environ={"SVC": "billing-engine"})
    assert cfg.service == "billing-engine"
    assert cfg.audit.path == "/tmp/${HOME}/a"
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(tmp_path, text, key_dir), environ={})
    assert caught.value.errors == ["service: environment variable SVC is not set"]


def test_hs256_takes_a_secret_instead_of_keys(tmp_path: Path) -> None:
    secret = tmp_path / "mesh.secret"
    secret.write_text("s" * 40)
    cfg = config.parse({"service": "a", "identity": {"algorithm": "HS256",
                                                     "secret_file": str(secret)}})
    assert cfg.identity.secret_file == str(secret)
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"service": "a", "identity": {"algorithm": "HS256",
                                                   "jwks_file": str(secret)}})
    joined = "\n".join(caught.value.errors)
    assert "identity.secret_file: is required with HS256" in joined
    assert "identity.jwks_file:" in joined


def test_app_must_be_on_loopback(tmp_path: Path, key_dir: Path) -> None:
    doc = yaml.safe_load(SPEC_EXAMPLE.replace("KEYS", str(key_dir)))
    doc["inbound"]["app"] = "http://10.1.2.3:8000"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(doc)
    assert caught.value.errors[0].startswith("inbound.app:")


def test_redacted_config_hides_key_files(tmp_path: Path, key_dir: Path) -> None:
    cfg = config.load(write(tmp_path, SPEC_EXAMPLE, key_dir))
    doc = config.redacted(cfg)
    assert doc["identity"]["private_key_file"] == "[redacted]"
    assert doc["services"]["compliance-monitor"]["policy"]["timeout"] == 2.0


def test_check_command_exit_codes(tmp_path: Path, key_dir: Path) -> None:
    good = write(tmp_path, SPEC_EXAMPLE, key_dir)
    ok = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC_EXAMPLE.replace("KEYS", str(key_dir)).replace(
        "max_headers: 100", "max_headers: many\n  surprise: 1"))
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "limits.max_headers: must be a whole number" in lines
    assert "limits.surprise: unknown key" in lines


def test_a_whole_value_from_the_environment_keeps_its_yaml_type(
    tmp_path: Path, key_dir: Path
) -> None:
    text = SPEC_EXAMPLE.replace("attempts: 3", "attempts: ${N}").replace(
        "    mesh: false", "    mesh: ${M}").replace("sample_ratio: 1.0", "sample_ratio: ${R}")
    cfg = config.load(write(tmp_path, text, key_dir), environ={"N": "5", "M": "false",
                                                                "R": "0.5"})
    assert cfg.defaults.retry.attempts == 5
    assert cfg.services["payer-gateway"].mesh is False
    assert cfg.tracing.sample_ratio == 0.5


def test_route_templates_follow_the_route_table_rule(tmp_path: Path, key_dir: Path) -> None:
    doc = yaml.safe_load(SPEC_EXAMPLE.replace("KEYS", str(key_dir)))
    doc["services"]["insurance-verification"]["routes"] = ["/ok/{id}", "/p/{my-id}"]
    with pytest.raises(config.ConfigError) as caught:
        config.parse(doc)
    assert caught.value.errors == [
        "services.insurance-verification.routes[1]: "
        "a '{name}' must be a whole path segment, the name an identifier",
    ]


def test_a_minimal_config_loads_to_exactly_the_settings_defaults(key_dir: Path) -> None:
    # Every default has one owner, the settings dataclass: a loader literal that
    # drifts from it shows here.
    pem, jwks = str(key_dir / "billing-engine.pem"), str(key_dir / "jwks.json")
    cfg = config.parse({
        "service": "billing-engine",
        "identity": {"private_key_file": pem, "jwks_file": jwks},
    })
    assert cfg == Config(
        service="billing-engine", identity=Identity(private_key_file=pem, jwks_file=jwks)
    )


def test_minimal_parts_load_to_their_settings_defaults(key_dir: Path) -> None:
    pem, jwks = str(key_dir / "billing-engine.pem"), str(key_dir / "jwks.json")
    cfg = config.parse({
        "service": "billing-engine",
        "identity": {"private_key_file": pem, "jwks_file": jwks},
        "inbound": {"policy": [{"from": ["a"]}]},
        "defaults": {"health_check": {}},
        "services": {"a": {"endpoints": ["http://a:15006"]}},
    })
    assert cfg.inbound == Inbound(policy=(PolicyRule(sources=("a",)),))
    assert cfg.defaults == ServicePolicy(health_check=HealthCheck())
    assert cfg.services == {
        "a": Service(name="a", endpoints=("http://a:15006",), policy=cfg.defaults),
    }


def test_path_patterns_follow_the_policy_rule(tmp_path: Path, key_dir: Path) -> None:
    doc = yaml.safe_load(SPEC_EXAMPLE.replace("KEYS", str(key_dir)))
    doc["inbound"]["public_paths"] = ["/health", "*"]
    doc["inbound"]["policy"][0]["paths"] = ["/claims/**"]
    with pytest.raises(config.ConfigError) as caught:
        config.parse(doc)
    assert caught.value.errors == [
        "inbound.policy[0].paths[0]: a '*' may only end a path, as '/*'",
        "inbound.public_paths[1]: must be a path that begins with '/'",
    ]


def minimal(**sections: object) -> dict[str, object]:
    return {"service": "a", "identity": {"algorithm": "HS256", "secret_file": __file__},
            **sections}


@pytest.mark.parametrize(("key", "value"), [
    ("drain_timeout", "1" + "0" * 400 + "s"),
    ("drain_timeout", "\u0661\u0660s"),
    ("limits", {"max_request_body": "9" * 5000}),
    ("limits", {"max_request_body": "\u0661\u0660"}),
    ("limits", {"max_request_body": 10**400}),
    ("defaults", {"retry": {"budget": {"ratio": float("nan")}}}),
    ("defaults", {"retry": {"budget": {"min_per_second": float("inf")}}}),
    ("defaults", {"retry": {"budget": {"min_per_second": 10**400}}}),
    ("listen", {"admin": "127.0.0.1:\u0661\u0665\u0660\u0660\u0660"}),
])
def test_numbers_out_of_reach_are_config_errors(key: str, value: object) -> None:
    # Before: an infinite drain_timeout, a NaN ratio, an OverflowError, Python's own message.
    with pytest.raises(config.ConfigError) as err:
        config.parse(minimal(**{key: value}), environ={})
    assert len(err.value.errors) == 1 and "int_max_str_digits" not in err.value.errors[0]


@pytest.mark.parametrize("text", [
    "service: a\nidentity: 2001-02-30\n",  # ValueError from PyYAML's date constructor
    "service: !!timestamp x\n",  # AttributeError
    "service: " + "[" * 3000 + "\n",  # RecursionError
    "service: &s [*s]\nidentity: {}\n",  # a list that holds itself
])
def test_yaml_that_pyyaml_cannot_read_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path, environ={})
    assert err.value.errors[0].startswith("(")


def test_a_variable_that_pyyaml_cannot_read_is_judged_as_text() -> None:
    # `${T}` alone takes the YAML type of its value; `2001-02-30` has none (ValueError).
    with pytest.raises(config.ConfigError) as err:
        config.parse(minimal(drain_timeout="${T}"), environ={"T": "2001-02-30"})
    assert err.value.errors == [
        "drain_timeout: must be a duration with a unit (ms, s, m, h, d), such as 250ms or 5s"]
