"""The closed vocabularies the config, identity, telemetry and the stacks share.

Each set of names is written once, here: the loader checks a config value
against it, and the module that acts on the name reads the same set, so the
two can never disagree. Pure: imports nothing of the sidecar.
"""

from __future__ import annotations

import re

# -- service names (SPEC "Config": DNS label rules, matched case-insensitively) --

_SERVICE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
SERVICE_NAME_RULE = (
    "lowercase letters, digits and '-', at most 63 characters, not starting or ending with '-'"
)
"""The rule `is_service_name` checks, in words, for error messages."""

RESERVED_SERVICE = "_sidecar"
"""The first path segment of the sidecar's own API (`/_sidecar/v1/...`): never a service."""

API_PREFIX = f"/{RESERVED_SERVICE}/v1/"
"""Where the sidecar's own API lives on the outbound port (SPEC "Workflows")."""

ANY_SERVICE = "*"
"""A policy rule's `from` entry that allows every verified service."""


_TRUST_DOMAIN = re.compile(r"[a-z0-9.-]{1,253}")
TRUST_DOMAIN_RULE = "a DNS-style trust domain such as example.local"
SPIFFE_SCHEME = "spiffe://"


def is_service_name(name: object) -> bool:
    """True if `name` is a DNS label in any letter case.

    Only ASCII counts: a name is also a file name, a header value and a
    metrics label, and no other character may case-fold its way in.
    """
    return (
        isinstance(name, str)
        and name.isascii()
        and _SERVICE_NAME.fullmatch(name.lower()) is not None
    )


def is_trust_domain(name: object) -> bool:
    """True if `name` is a trust domain: lowercase letters, digits, '.' and '-'."""
    return isinstance(name, str) and _TRUST_DOMAIN.fullmatch(name.lower()) is not None


def spiffe_id(trust_domain: str, service: str) -> str:
    """`spiffe://<trust_domain>/<service>`: a token's `sub` and a certificate's URI SAN."""
    return f"{SPIFFE_SCHEME}{trust_domain}/{service}"


def service_of(spiffe: str | None, trust_domain: str | None) -> str | None:
    """The service a SPIFFE ID of `trust_domain` names (lowercased), else None.

    Only the form `spiffe_id` writes counts: one path segment that is a
    service name, in this trust domain and no other.
    """
    if spiffe is None or trust_domain is None:
        return None
    prefix = spiffe_id(trust_domain, "")
    if not spiffe.lower().startswith(prefix):
        return None
    name = spiffe[len(prefix):]
    return name.lower() if is_service_name(name) else None


# -- HTTP methods -----------------------------------------------------------------

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
"""The standard methods: the ones config may name and telemetry may show."""

# -- token signing algorithms (SPEC "Identity tokens") ---------------------------

KEY_PAIR_ALGORITHMS = ("EdDSA", "ES256", "RS256")
"""Signed with a service's own private key, checked with its public key."""

SECRET_ALGORITHM = "HS256"
"""One shared secret for the whole mesh: for compatibility, and weaker."""

ALGORITHMS = (*KEY_PAIR_ALGORITHMS, SECRET_ALGORITHM)

CERT_ALGORITHMS = ("ES256", "EdDSA")
"""Keys of the mesh CA and its leaf certificates (`sidecar certs`): ECDSA P-256 or Ed25519."""

# -- encryption in transit (SPEC "Encryption in transit") -------------------------

TLS_DISABLED = "disabled"
TLS_PERMISSIVE = "permissive"
TLS_STRICT = "strict"
TLS_MODES = (TLS_DISABLED, TLS_PERMISSIVE, TLS_STRICT)

# -- span export (SPEC "Config", `tracing`) --------------------------------------

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
