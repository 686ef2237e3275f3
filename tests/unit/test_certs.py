"""`sidecar certs`: the mesh CA, leaf certificates with SPIFFE IDs, and `sidecar check`'s view."""

from __future__ import annotations

import datetime
import ssl
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from sidecar import cli
from sidecar.config.settings import TLS
from sidecar.tls import certs, check

TD = "intelluxe.local"


def now() -> datetime.datetime:
    """The present, read when a check runs: certificates are made when a test
    runs, and a whole suite can take longer than their five minutes of backdating."""
    return datetime.datetime.now(datetime.UTC)


def make(tmp_path: Path, service: str = "billing", *, algorithm: str = "ES256",
         ca_dir: str = "ca", **issue: object) -> TLS:
    """A CA and one leaf under `tmp_path`, as a strict `tls` section names them."""
    ca = tmp_path / ca_dir
    if not (ca / certs.CA_FILE).exists():
        certs.make_ca(ca, algorithm=algorithm)
    cert, key = certs.issue(ca, service=service, trust_domain=TD, out_dir=tmp_path / "leaf",
                            **issue)  # type: ignore[arg-type]
    return TLS(mode="strict", ca_file=str(ca / certs.CA_FILE), cert_file=str(cert),
               key_file=str(key))


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_a_leaf_names_its_service_by_spiffe_id_and_dns_and_chains_to_the_ca(
        tmp_path: Path, algorithm: str) -> None:
    tls = make(tmp_path, algorithm=algorithm)
    assert tls.cert_file is not None and tls.ca_file is not None
    leaf = certs.load_certificates(tls.cert_file)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/billing"]
    assert sans.get_values_for_type(x509.DNSName) == ["billing"]
    assert not certs.is_ca(leaf) and certs.is_ca(certs.load_certificates(tls.ca_file)[0])
    assert check.problems(tls, service="billing", trust_domain=TD, now=now()) == []
    # What the ssl module itself makes of them: a context loads and verifies both.
    context = ssl.create_default_context(cafile=tls.ca_file)
    context.load_cert_chain(tls.cert_file, tls.key_file)


def test_keys_are_private_and_nothing_is_replaced_without_force(tmp_path: Path) -> None:
    tls = make(tmp_path)
    for path in (tls.key_file, str(tmp_path / "ca" / certs.CA_KEY)):
        assert stat.S_IMODE(Path(str(path)).stat().st_mode) == 0o600
    before = Path(str(tls.cert_file)).read_bytes()
    with pytest.raises(FileExistsError):
        certs.issue(tmp_path / "ca", service="billing", trust_domain=TD, out_dir=tmp_path / "leaf")
    with pytest.raises(FileExistsError):
        certs.make_ca(tmp_path / "ca")
    assert Path(str(tls.cert_file)).read_bytes() == before
    certs.issue(tmp_path / "ca", service="billing", trust_domain=TD, out_dir=tmp_path / "leaf",
                overwrite=True)
    assert Path(str(tls.cert_file)).read_bytes() != before


def test_a_leaf_may_not_outlive_its_ca(tmp_path: Path) -> None:
    certs.make_ca(tmp_path / "ca", days=30)
    with pytest.raises(ValueError, match="outlive its CA"):
        certs.issue(tmp_path / "ca", service="b", trust_domain=TD, out_dir=tmp_path, days=31)


def test_check_names_each_problem_with_its_key(tmp_path: Path) -> None:
    good = make(tmp_path)
    other = make(tmp_path / "other", service="billing")  # same name, another CA
    wrong_name = make(tmp_path / "named", service="claims")

    present = now()

    def found(tls: TLS, now: datetime.datetime | None = present) -> list[str]:
        return check.problems(tls, service="billing", trust_domain=TD, now=now)

    assert found(replace(good, key_file=other.key_file)) == [
        "tls.key_file: is not the private key of tls.cert_file's certificate"]
    assert found(replace(good, cert_file=other.cert_file, key_file=other.key_file)) == [
        "tls.cert_file: 'billing' does not chain to a CA in tls.ca_file"]
    named = found(replace(wrong_name, ca_file=wrong_name.ca_file))
    assert named == [f"tls.cert_file: its SPIFFE ID is spiffe://{TD}/claims; "
                     f"this service is spiffe://{TD}/billing"]
    assert found(replace(good, ca_file=good.cert_file)) == [
        "tls.ca_file: certificate 1 ('billing') is not a CA",
        "tls.cert_file: 'billing' does not chain to a CA in tls.ca_file"]
    assert found(replace(good, ca_file=str(tmp_path / "missing.pem")))[0].startswith(
        "tls.ca_file: [Errno 2]")
    later = present + datetime.timedelta(days=certs.LEAF_DAYS + 1)
    ends = certs.load_certificates(str(good.cert_file))[0].not_valid_after_utc
    assert found(good, now=later) == [f"tls.cert_file: 'billing' expired at "
                                      f"{ends:%Y-%m-%dT%H:%M:%SZ}"]
    assert found(good, now=None) == []  # `run` leaves dates to readiness


def test_a_bundle_of_old_and_new_ca_accepts_leaves_of_either(tmp_path: Path) -> None:
    old = make(tmp_path / "old")
    new = make(tmp_path / "new")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(str(old.ca_file)).read_bytes() + Path(str(new.ca_file)).read_bytes())
    for tls in (old, new):
        assert check.problems(replace(tls, ca_file=str(bundle)), service="billing",
                              trust_domain=TD, now=now()) == []


def test_the_cli_makes_shows_and_refuses_with_exit_2(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ca, out = str(tmp_path / "ca"), str(tmp_path / "out")
    assert cli.main(["certs", "ca", "--out", ca, "--algorithm", "EdDSA"]) == 0
    assert cli.main(["certs", "issue", "--ca", ca, "--service", "Billing", "--trust-domain", TD,
                     "--out", out, "--days", "10"]) == 0
    capsys.readouterr()
    assert cli.main(["certs", "show", f"{out}/billing.crt"]) == 0
    shown = capsys.readouterr().out
    assert f"spiffe id: spiffe://{TD}/billing" in shown
    assert "subject:   CN=billing,O=intelluxe.local" in shown
    assert "days left: 9" in shown and "not after: " in shown
    assert cli.main(["certs", "ca", "--out", ca]) == 2
    assert "already there" in capsys.readouterr().err
    assert cli.main(["certs", "issue", "--ca", ca, "--service", "b_x", "--trust-domain", TD,
                     "--out", out]) == 2
    assert cli.main(["certs", "show", str(tmp_path / "none.crt")]) == 2
