"""Identity tokens: minting them outbound, checking them inbound.

Both are plain objects with an injected clock; the layers that attach and
check the `x-service-token` header wrap them. The rules are SPEC.md's
"Identity tokens", in the order `Verifier.verify` applies them.
"""

from __future__ import annotations

import binascii
import json
import math
import uuid
from collections import OrderedDict
from typing import Any

import jwt
from jwt.utils import base64url_decode

from sidecar import names
from sidecar.clock import SYSTEM_CLOCK, Clock
from sidecar.identity.keys import (
    KeySet,
    VerifyKey,
    check_service_name,
    private_key_problem,
)
from sidecar.names import SECRET_ALGORITHM, spiffe_id

REFRESH_AT = 0.8
"""A minted token is reused until this fraction of its lifetime has passed."""

FORBIDDEN_HEADERS = ("crit", "jku", "x5u", "jwk", "x5c")
"""Headers that would make a verifier fetch or trust key material from the token."""

MAX_TOKEN_CHARS = 8192
CACHE_SIZE = 1024
MAX_NUMERIC_DATE = 253_402_300_799
"""9999-12-31T23:59:59Z: a time claim (RFC 7519 NumericDate) beyond it is refused.

The bound is checked on the number as it came, before any arithmetic, so a
10**400 or a NaN is a failed check and never an OverflowError.
"""

# Signature only: every claim check (and all time checks) happens here, on
# the injected clock, so PyJWT's own checks are all off.
_SIGNATURE_ONLY: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}
_DECODER = jwt.PyJWT()


class TokenError(Exception):
    """A token failed a check; `check` names it. The message never holds token content."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check
        self.message = message


class Minter:
    """Makes this service's tokens, one per audience, reused until 80% of their TTL."""

    def __init__(
        self,
        *,
        service: str,
        algorithm: str,
        key: Any,
        ttl: float,
        trust_domain: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        check_service_name(service)
        problem = private_key_problem(key, algorithm)
        if problem:
            raise ValueError(f"cannot mint tokens: {problem}")
        # Claims carry whole seconds; a TTL under one would mint dead tokens.
        if not 1 <= ttl <= MAX_NUMERIC_DATE:
            raise ValueError(f"token ttl must be at least 1s and finite, got {ttl}")
        self._service = service
        self._algorithm = algorithm
        self._key = key
        self._ttl = math.floor(ttl)
        self._subject = spiffe_id(trust_domain, service) if trust_domain else service
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}

    @property
    def service(self) -> str:
        """The service these tokens speak for."""
        return self._service

    def token_for(self, audience: str) -> str:
        """A token for calls to `audience`, fresh or reused."""
        now = self._clock.time()
        cached = self._cache.get(audience)
        if cached is not None and now < cached[1]:
            return cached[0]
        iat = math.floor(now)
        token = jwt.encode(
            {
                "iss": self._service,
                "sub": self._subject,
                "aud": audience,
                "iat": iat,
                "exp": iat + self._ttl,
                "jti": uuid.uuid4().hex,
            },
            self._key,
            algorithm=self._algorithm,
            headers={"kid": self._service},
        )
        self._cache[audience] = (token, iat + REFRESH_AT * self._ttl)
        return token


class Verifier:
    """Checks inbound tokens for `service`; `verify` returns the caller or raises TokenError.

    Keys come from a KeySet (each key with its one algorithm), or with HS256
    from the mesh's shared secret, which answers for every kid. Tokens that
    passed are remembered until they expire, so a caller's repeated token costs
    a dict lookup instead of a signature check.
    """

    def __init__(
        self,
        *,
        service: str,
        keys: KeySet | None = None,
        secret: bytes | None = None,
        max_ttl: float,
        skew: float,
        clock: Clock = SYSTEM_CLOCK,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if (keys is None) == (secret is None):
            raise ValueError("a verifier needs exactly one of keys (JWKS) or secret (HS256)")
        if secret is not None:
            problem = private_key_problem(secret, SECRET_ALGORITHM)
            if problem:
                raise ValueError(f"cannot verify tokens: {problem}")
        # Written as ranges so that NaN fails too: a NaN max_ttl would pass every token.
        if not (0 < max_ttl <= MAX_NUMERIC_DATE and 0 <= skew <= MAX_NUMERIC_DATE
                and cache_size >= 0):
            raise ValueError("max_ttl must be positive, skew and cache_size not negative, "
                             "all finite")
        self._service = service.lower()
        self._keys = keys
        self._secret_key = VerifyKey(SECRET_ALGORITHM, secret) if secret is not None else None
        self._max_ttl = max_ttl
        self._skew = skew
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def service(self) -> str:
        """The service these tokens must be addressed to (lowercased)."""
        return self._service

    def verify(self, token: str) -> str:
        """The calling service (its `iss`, lowercased), or TokenError naming the failed check."""
        now = self._clock.time()
        hit = self._cache.get(token)
        if hit is not None:
            caller, exp = hit
            if now <= exp + self._skew:
                self._cache.move_to_end(token)
                return caller
            del self._cache[token]
        caller, exp = self._check(token, now)
        if self._cache_size:
            self._cache[token] = (caller, exp)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return caller

    def _check(self, token: str, now: float) -> tuple[str, float]:
        kid, keys = self._keys_for(token)
        claims = _signed_claims(token, keys)
        caller = self._issuer(claims, kid)
        self._check_audience(claims.get("aud"))
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if iat > now + self._skew:
            raise TokenError("not_yet_valid", "iat is in the future beyond the clock skew")
        nbf = claims.get("nbf")
        if nbf is not None and _number(claims, "nbf") > now + self._skew:
            raise TokenError("not_yet_valid", "nbf is in the future beyond the clock skew")
        if exp < now - self._skew:
            raise TokenError("expired", "exp is in the past beyond the clock skew")
        if exp - iat > self._max_ttl:
            raise TokenError(
                "ttl_too_long", f"the token lives longer than the {self._max_ttl:g}s allowed"
            )
        return caller, exp

    def _keys_for(self, token: str) -> tuple[str, tuple[VerifyKey, ...]]:
        """Read the unverified header and pick the kid's keys (more than one while it
        rotates); the header's `alg` must be the keys' own."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise TokenError("malformed", "the token is not a well-formed JWT")
        header = _unverified_header(token)
        for name in FORBIDDEN_HEADERS:
            if name in header:
                raise TokenError("forbidden_header", f"the token has a {name!r} header")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("kid_missing", "the token has no kid header")
        if not names.is_service_name(kid):
            # Before the lookup: a kid such as "\u212aey" would case-fold onto "key".
            raise TokenError("kid_unknown", "the token's kid is not a service name")
        if self._secret_key is not None:
            keys: tuple[VerifyKey, ...] = (self._secret_key,)
        else:
            assert self._keys is not None
            keys = self._keys.candidates(kid)
            if not keys:
                raise TokenError("kid_unknown", "the token's kid is not in the JWKS")
        matching = tuple(key for key in keys if key.algorithm == header.get("alg"))
        if not matching:
            raise TokenError("algorithm", f"the token's alg is not the key's {keys[0].algorithm}")
        return kid, matching

    def _issuer(self, claims: dict[str, Any], kid: str) -> str:
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss.lower() != kid.lower():
            raise TokenError("kid_not_issuer", "the token's kid does not equal its iss")
        try:
            # The caller's name goes into headers, logs and policy: keep it a name.
            check_service_name(iss)
        except ValueError:
            raise TokenError("issuer", "the token's iss is not a service name") from None
        return iss.lower()

    def _check_audience(self, aud: Any) -> None:
        if isinstance(aud, str):
            audiences = [aud]
        elif isinstance(aud, list) and aud:
            audiences = aud
        else:
            raise TokenError("audience", f"the token's aud is not {self._service}")
        if not all(isinstance(a, str) and a.lower() == self._service for a in audiences):
            raise TokenError("audience", f"the token's aud is not only {self._service}")


def _signed_claims(token: str, keys: tuple[VerifyKey, ...]) -> dict[str, Any]:
    """The claims of `token` once one of `keys` checks its signature."""
    for key in keys:
        try:
            claims: dict[str, Any] = _DECODER.decode(
                token, key.key, algorithms=[key.algorithm], options=_SIGNATURE_ONLY
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.InvalidTokenError:
            raise TokenError("malformed", "the token is not a well-formed JWT") from None
        return claims
    raise TokenError("signature", "the signature does not check")


def _unverified_header(token: str) -> dict[str, Any]:
    # Parsed here rather than by PyJWT, which judges `crit` itself first: every
    # forbidden header must fail as "forbidden_header", whatever its value.
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError
        header = json.loads(base64url_decode(parts[0]))
    except (ValueError, binascii.Error, RecursionError):
        raise TokenError("malformed", "the token is not a well-formed JWT") from None
    if not isinstance(header, dict):
        raise TokenError("malformed", "the token is not a well-formed JWT")
    return header


def _number(claims: dict[str, Any], name: str) -> float:
    """A time claim as seconds since the epoch, bounded before it is converted."""
    value = claims.get(name)
    if value is None:
        raise TokenError(f"missing_{name}", f"the token has no {name} claim")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError("malformed", f"the token's {name} is not a number")
    # Compared as it came (an int stays an int), so 10**400 cannot overflow
    # and NaN, failing every comparison, is refused with the infinities.
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise TokenError("malformed", f"the token's {name} is not a time from 1970 to 9999")
    return float(value)


__all__ = ["Minter", "TokenError", "Verifier"]
