"""Config for SPEC's `tls` and `inbound.rate_limits` sections, and `sidecar check` on them."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import cli
from sidecar.config import loader as config
from sidecar.config.settings import TLS, Bucket, RateLimit
from sidecar.config.units import parse_duration, parse_rate
from sidecar.identity import keys
from sidecar.tls import certs

TD = "intelluxe.local"

SPEC_SECTIONS = """
tls:
  mode: strict
  ca_file: CERTS/ca.pem
  cert_file: CERTS/billing-engine.crt
  key_file: CERTS/billing-engine.key
  expiry_warning: 30d
inbound:
  max_in_flight: 200
  rate_limits:
    - {total: {rate: 500/s, burst: 1000}}
    - {per_caller: {rate: 100/s, burst: 200}, methods: [POST], paths: ["/claims/*"]}
    - {from: [healthcare-api], per_caller: {rate: 300/s, burst: 300}}
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    keys.generate(service="billing-engine", out_dir=tmp_path)
    (tmp_path / "jwks.json").write_text(json.dumps(keys.merge_jwks([tmp_path])))
    certs.make_ca(tmp_path)
    certs.issue(tmp_path, service="billing-engine", trust_domain=TD, out_dir=tmp_path)
    return tmp_path


def doc(files: Path, extra: str = SPEC_SECTIONS) -> dict[str, Any]:
    base: dict[str, Any] = {
        "service": "billing-engine",
        "trust_domain": TD,
        "identity": {"private_key_file": str(files / "billing-engine.pem"),
                     "jwks_file": str(files / "jwks.json")},
    }
    base.update(yaml.safe_load(extra.replace("CERTS", str(files))))
    return base


def errors_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(raw)
    return caught.value.errors


def test_spec_sections_load_into_the_typed_tree(files: Path) -> None:
    cfg = config.parse(doc(files))
    assert cfg.tls == TLS(mode="strict", ca_file=str(files / "ca.pem"),
                          cert_file=str(files / "billing-engine.crt"),
                          key_file=str(files / "billing-engine.key"), expiry_warning=30 * 86400)
    assert cfg.inbound.max_in_flight == 200
    assert cfg.inbound.rate_limits == (
        RateLimit(total=Bucket(rate=500, burst=1000)),
        RateLimit(per_caller=Bucket(rate=100, burst=200), methods=("POST",),
                  paths=("/claims/*",)),
        RateLimit(per_caller=Bucket(rate=300, burst=300), sources=("healthcare-api",)),
    )
    assert config.redacted(cfg)["tls"]["key_file"] == "[redacted]"


def test_tls_is_off_unless_asked_and_then_needs_its_files_and_a_trust_domain(files: Path) -> None:
    assert config.parse(doc(files, "{}")).tls == TLS()
    raw = doc(files, "tls: {mode: permissive, protocol: tls1.3}")
    del raw["trust_domain"]
    assert errors_of(raw) == [
        "tls.protocol: unknown key",
        "tls.ca_file: is required with mode permissive",
        "tls.cert_file: is required with mode permissive",
        "tls.key_file: is required with mode permissive",
        "trust_domain: is required with tls.mode permissive: SPIFFE IDs are "
        "spiffe://<trust_domain>/<service>",
    ]
    assert errors_of(doc(files, "tls: {mode: mutual}")) == [
        "tls.mode: must be one of disabled, permissive, strict"]


def test_rate_limit_rules_are_checked_with_their_key_paths(files: Path) -> None:
    raw = doc(files, """
inbound:
  max_in_flight: 0
  rate_limits:
    - {total: {rate: 5, burst: 1}}
    - {total: {rate: 5/s, burst: 1}, per_caller: {rate: 1/s, burst: 1}}
    - {per_caller: {rate: 1/s}, from: [Not_A_Name]}
    - {}
""")
    assert errors_of(raw) == [
        "inbound.rate_limits[0].total.rate: must be a rate such as 100/s, 600/m or 1000/h",
        "inbound.rate_limits[1]: needs exactly one of total or per_caller",
        "inbound.rate_limits[2].per_caller.burst: is required",
        "inbound.rate_limits[2].from[0]: must be a service name: lowercase letters, digits and "
        "'-', at most 63 characters, not starting or ending with '-'",
        "inbound.rate_limits[3]: needs exactly one of total or per_caller",
        "inbound.max_in_flight: must be >= 1",
    ]


def test_a_service_ca_file_is_for_https_outside_the_mesh(files: Path) -> None:
    ca = str(files / "ca.pem")
    raw = doc(files, "{}")
    raw["services"] = {
        "payer": {"endpoints": ["https://payer.example.com"], "mesh": False, "ca_file": ca},
        "billing": {"endpoints": ["http://billing:15006"], "ca_file": ca},
        "plain": {"endpoints": ["http://plain:80"], "mesh": False, "ca_file": ca},
    }
    assert errors_of(raw) == [
        "services.billing.ca_file: is only for services outside the mesh (mesh: false); "
        "mesh services are checked against tls.ca_file",
        "services.plain.ca_file: is used only with https:// endpoints",
    ]
    del raw["services"]["billing"], raw["services"]["plain"]
    assert config.parse(raw).services["payer"].ca_file == ca


def test_units_of_days_and_rates() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_rate("500/s") == 500
    assert parse_rate("30/m") == 0.5
    assert parse_rate("3600/h") == 1
    for bad in ("5", "0/s", "5/d", 5):
        with pytest.raises(ValueError):
            parse_rate(bad)


def write_config(files: Path, raw: dict[str, Any]) -> str:
    path = files / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_check_validates_the_certificate_files(files: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    raw = doc(files)
    assert cli.main(["check", "-c", write_config(files, raw)]) == 0
    # A certificate for another service, and one that has expired: both named.
    certs.issue(files, service="claims", trust_domain=TD, out_dir=files / "other")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    certs.issue(files, service="billing-engine", trust_domain=TD, out_dir=files / "old",
                days=1, now=long_ago)
    for folder, name, problem in [
        ("other", "claims", f"tls.cert_file: its SPIFFE ID is spiffe://{TD}/claims; "
                            f"this service is spiffe://{TD}/billing-engine"),
        ("old", "billing-engine", "tls.cert_file: 'billing-engine' expired at "),
    ]:
        raw["tls"]["cert_file"] = str(files / folder / f"{name}.crt")
        raw["tls"]["key_file"] = str(files / folder / f"{name}.key")
        capsys.readouterr()
        assert cli.main(["check", "-c", write_config(files, raw)]) == 2
        assert capsys.readouterr().err.startswith(problem)
