"""The mesh's certificates: a CA, leaf certificates that name a service, and reading them.

A leaf's URI SAN is the service's SPIFFE ID (`spiffe://<trust_domain>/<name>`,
the token's `sub`) and its DNS SAN the service name, so a client checking the
host name against the routed service already refuses an impostor during the
handshake. Private keys are written 0600 and never replaced unless asked.
`sidecar certs ca|issue|show` are thin wrappers around `make_ca`, `issue` and
`describe`.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar import names
from sidecar.files import write_private

CA_DAYS = 3650  # a trust anchor lives long; leaves are what rotate
LEAF_DAYS = 90
BACKDATE = datetime.timedelta(minutes=5)  # clocks across the mesh differ a little
CA_FILE, CA_KEY = "ca.pem", "ca.key"
DEFAULT_ALGORITHM = names.CERT_ALGORITHMS[0]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key(algorithm: str) -> Any:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of "
                     f"{', '.join(names.CERT_ALGORITHMS)}")


def _algorithm_of(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    raise ValueError(f"the CA key is a {type(key).__name__}; expected ECDSA P-256 or Ed25519")


def _hash_for(key: Any) -> hashes.SHA256 | None:
    # Ed25519 signs without a separate hash.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _write(out: Path, cert_name: str, key_name: str, cert: x509.Certificate, key: Any, *,
           overwrite: bool) -> tuple[Path, Path]:
    """The certificate and its key, or neither: an existing file stops both."""
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / cert_name, out / key_name
    if not overwrite:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} is already there; not replacing it (--force does)")
    write_private(key_path, _key_pem(key), overwrite=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError("--days must be at least 1")


def make_ca(out_dir: str | Path, *, days: int = CA_DAYS, algorithm: str = DEFAULT_ALGORITHM,
            overwrite: bool = False, now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """Write `out_dir/ca.pem` and `ca.key` (0600): a mesh CA that signs only leaves.

    Its name carries a fragment of its key identifier, so an old and a new CA
    in one bundle during a rotation never share a subject. Its validity
    starts at `now` (the present unless given).
    """
    _check_days(days)
    key = _new_key(algorithm)
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar mesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"sidecar mesh CA {key_id.digest.hex()[:8]}"),
    ])
    now = now or _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(key_id, critical=False)
        .sign(key, _hash_for(key))
    )
    return _write(Path(out_dir), CA_FILE, CA_KEY, cert, key, overwrite=overwrite)


def issue(ca_dir: str | Path, *, service: str, trust_domain: str, out_dir: str | Path,
          days: int = LEAF_DAYS, overwrite: bool = False,
          now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """Write `out_dir/<service>.crt` and `<service>.key` (0600), signed by the CA in `ca_dir`.

    The key has the CA's algorithm. A leaf never outlives its CA: ask for
    fewer days, or rotate the CA first. Its validity starts at `now` (the
    present unless given).
    """
    _check_days(days)
    if not names.is_service_name(service):
        raise ValueError(f"--service must be a service name: {names.SERVICE_NAME_RULE}")
    if not names.is_trust_domain(trust_domain):
        raise ValueError(f"--trust-domain must be {names.TRUST_DOMAIN_RULE}")
    service, trust_domain = service.lower(), trust_domain.lower()
    ca_cert = load_certificates(Path(ca_dir) / CA_FILE)[0]
    ca_key = load_private_key(Path(ca_dir) / CA_KEY)
    if not same_key(ca_key, ca_cert):
        raise ValueError(f"{Path(ca_dir) / CA_KEY} is not the key of {Path(ca_dir) / CA_FILE}")
    now = now or _now()
    not_after = now + datetime.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise ValueError(f"a {days}-day certificate would outlive its CA (it expires "
                         f"{ca_cert.not_valid_after_utc:%Y-%m-%d}); ask for fewer days")
    key = _new_key(_algorithm_of(ca_key))
    identity = names.spiffe_id(trust_domain, service)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, service),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(identity), x509.DNSName(service),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        # Every sidecar is both: a server on 15006 and a client of its peers.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )
    return _write(Path(out_dir), f"{service}.crt", f"{service}.key", cert, key,
                  overwrite=overwrite)


# -- reading ---------------------------------------------------------------------


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; ValueError when there is none."""
    data = Path(path).read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path}: not a PEM certificate file") from None
    if not certs:
        raise ValueError(f"{path}: no certificate in it")
    return certs


def load_private_key(path: str | Path) -> Any:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                      | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: a {type(key).__name__} cannot sign for TLS here")
    return key


def same_key(key: Any, cert: x509.Certificate) -> bool:
    """Whether `key` is the private half of the certificate's public key."""
    form = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(key.public_key().public_bytes(*form) == cert.public_key().public_bytes(*form))


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs that are SPIFFE IDs."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.lower().startswith(names.SPIFFE_SCHEME)]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def days_left(cert: x509.Certificate, now: datetime.datetime | None = None) -> float:
    """Days until the certificate expires (negative once it has)."""
    left = cert.not_valid_after_utc - (now or _now())
    return left.total_seconds() / 86400


def describe(path: str | Path, now: datetime.datetime | None = None) -> list[str]:
    """`sidecar certs show`: subject, SPIFFE ID, not-after and days left of each certificate."""
    lines: list[str] = []
    for cert in load_certificates(path):
        if lines:
            lines.append("")
        identity = ", ".join(spiffe_ids(cert)) or ("(none: a CA)" if is_ca(cert) else "(none)")
        lines += [
            f"subject:   {cert.subject.rfc4514_string()}",
            f"issuer:    {cert.issuer.rfc4514_string()}",
            f"spiffe id: {identity}",
            f"not after: {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            f"days left: {math.floor(days_left(cert, now))}",
        ]
    return lines
