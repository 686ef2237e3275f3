"""Whether the `tls` files can serve: what `sidecar check`, `run` and each reload verify.

The files parse, the key is the certificate's, the certificate chains to a CA
of the bundle and carries this service's SPIFFE ID, and (when asked) none of
it is outside its validity. Problems are `tls.<key>: message` lines, the
config's error form; nothing of a certificate but names and dates is quoted.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from sidecar.config.settings import TLS
from sidecar.names import spiffe_id
from sidecar.tls import certs


def problems(tls: TLS, *, service: str, trust_domain: str | None,
             now: datetime.datetime | None) -> list[str]:
    """Every problem with the files `tls` names; empty when they are fit to serve.

    With `now` None the validity dates are not checked: `run` starts with an
    expired certificate (not ready, saying why) so that replacing the files
    brings it back without a restart.
    """
    if not tls.enabled:
        return []
    out: list[str] = []
    cas = _read(out, "ca_file", tls.ca_file, certs.load_certificates)
    chain = _read(out, "cert_file", tls.cert_file, certs.load_certificates)
    key = _read(out, "key_file", tls.key_file, certs.load_private_key)
    for index, ca in enumerate(cas or []):
        if not certs.is_ca(ca):
            out.append(f"tls.ca_file: certificate {index + 1} ({_name(ca)}) is not a CA")
    if not chain:
        return out
    leaf = chain[0]
    if key is not None and not certs.same_key(key, leaf):
        out.append("tls.key_file: is not the private key of tls.cert_file's certificate")
    anchor = issuer_in(leaf, chain[1:], cas or [])
    if cas and anchor is None:
        out.append(f"tls.cert_file: {_name(leaf)} does not chain to a CA in tls.ca_file")
    expected = spiffe_id(trust_domain or "", service)
    found = certs.spiffe_ids(leaf)
    if expected not in found:
        out.append(f"tls.cert_file: its SPIFFE ID is {', '.join(found) or 'missing'}; "
                   f"this service is {expected}")
    if now is not None:
        out += [f"tls.{key_name}: {message}"
                for key_name, cert in (("cert_file", leaf), ("ca_file", anchor))
                if cert is not None and (message := validity(cert, now)) is not None]
    return out


def validity(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    """Why `cert` is not valid at `now`, or None."""
    if now >= cert.not_valid_after_utc:
        return f"{_name(cert)} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    if now < cert.not_valid_before_utc:
        return f"{_name(cert)} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
    return None


def issuer_in(leaf: x509.Certificate, intermediates: list[x509.Certificate],
              cas: list[x509.Certificate]) -> x509.Certificate | None:
    """The CA of `cas` that `leaf` chains to, through `intermediates` if need be, or None."""
    current = leaf
    for _ in range(len(intermediates) + 1):
        for ca in cas:
            if _issued_by(current, ca):
                return ca
        parent = next((c for c in intermediates if _issued_by(current, c)), None)
        if parent is None:
            return None
        current = parent
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read(out: list[str], key: str, path: str | None, load: Any) -> Any:
    if path is None:
        return None
    try:
        return load(path)
    except (ValueError, OSError) as exc:
        out.append(f"tls.{key}: {exc}")
        return None


def _name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names:
        return "the certificate"
    value = names[0].value
    return f"'{value if isinstance(value, str) else value.decode(errors='replace')}'"
