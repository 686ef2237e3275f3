"""TLS as a test's own client speaks it: its certificate (good, foreign, self-signed, expired),
a capture of what the first bytes on the wire were, and tokens of any mesh service."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy.process import CertRing, KeyRing
from sidecar.http.listener import no_hidden_resend
from sidecar.identity import keys
from sidecar.identity.tokens import Minter
from sidecar.names import spiffe_id
from sidecar.tls import certs

TLS_HANDSHAKE = 0x16
CLIENT_HELLO = 0x01


def is_client_hello(first: bytes) -> bool:
    """A TLS record of type handshake (0x16), version 3.x, holding a ClientHello (type 1)."""
    return len(first) >= 6 and first[0] == TLS_HANDSHAKE and first[1] == 3 \
        and first[5] == CLIENT_HELLO


def days_ago(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


def client_context(ring: CertRing, cert: Path | None = None, key: Path | None = None,
                   ) -> ssl.SSLContext:
    """Trusts the mesh CA; presents `cert` and `key` when given."""
    context = ssl.create_default_context(cafile=str(ring.ca_file))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def self_signed(folder: Path, service: str, trust_domain: str) -> tuple[Path, Path]:
    """A certificate that names `service` like a mesh leaf does, signed by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(spiffe_id(trust_domain, service)),
            x509.DNSName(service)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, service, cert, key)


def mislabelled(ring: CertRing, folder: Path, dns_name: str, service: str) -> tuple[Path, Path]:
    """A certificate of the mesh CA whose DNS SAN says `dns_name` but SPIFFE ID `service`:
    only the SPIFFE check can tell it is not `dns_name`'s."""
    ca_key = certs.load_private_key(ring.ca_dir / certs.CA_KEY)
    ca_cert = certs.load_certificates(ring.ca_file)[0]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(spiffe_id(ring.trust_domain, service)),
            x509.DNSName(dns_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write(folder, dns_name, cert, key)


def loopback_server(folder: Path) -> tuple[Path, Path, Path]:
    """A CA of its own and a server certificate for 127.0.0.1 (an IP SAN), as a service
    outside the mesh has: (CA file, certificate, key)."""
    certs.make_ca(folder / "ca")
    ca_key = certs.load_private_key(folder / "ca" / certs.CA_KEY)
    ca_cert = certs.load_certificates(folder / "ca" / certs.CA_FILE)[0]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payer")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return (folder / "ca" / certs.CA_FILE, *_write(folder, "payer", cert, key))


def _write(folder: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def foreign(folder: Path, service: str, trust_domain: str, **options: Any) -> tuple[Path, Path]:
    """A certificate for `service` from a CA of its own (not the mesh's)."""
    certs.make_ca(folder / "ca")
    return certs.issue(folder / "ca", service=service, trust_domain=trust_domain,
                       out_dir=folder, **options)


def expired(ring: CertRing, folder: Path, service: str) -> tuple[Path, Path]:
    """A certificate of the mesh CA for `service` that expired a week ago."""
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=8)
    return certs.issue(ring.ca_dir, service=service, trust_domain=ring.trust_domain,
                       out_dir=folder, days=1, now=long_ago)


def token(keyring: KeyRing, service: str, audience: str, trust_domain: str | None = None) -> str:
    """A valid token that `service` would attach for calls to `audience`."""
    key = keys.load_private_key(keyring.private_key(service), keyring.algorithm)
    minter = Minter(service=service, algorithm=keyring.algorithm, key=key, ttl=60,
                    trust_domain=trust_domain)
    return minter.token_for(audience)


async def tls_get(url: str, context: ssl.SSLContext, server_name: str,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One GET over a fresh TLS connection: (status, JSON body)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        no_hidden_resend(session)  # one request, one connection: one handshake to count
        async with session.get(url, ssl=context, server_hostname=server_name,
                               headers=headers or {}) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else {}
