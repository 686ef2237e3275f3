"""Key material: generating key pairs, merging and loading JWKS, loading keys.

Every service signs with its own private key; verifiers hold the public keys
of the mesh in one JWKS whose `kid`s are service names. The signing algorithm
of a public key is read from the key itself, never from a token or a label.

Errors name the file and what is wrong with it, never the key material.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from sidecar import names
from sidecar.config.settings import Identity
from sidecar.files import write_private
from sidecar.names import ALGORITHMS, KEY_PAIR_ALGORITHMS, SECRET_ALGORITHM

MIN_RSA_BITS = 2048
MIN_SECRET_BYTES = 32

# The JWK members that carry public key material, per key type: two keys with
# the same kid are "the same key" when these agree.
_PUBLIC_MEMBERS = {"OKP": ("crv", "x"), "EC": ("crv", "x", "y"), "RSA": ("n", "e")}


class KeyMaterialError(ValueError):
    """A key, secret or JWKS file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key ready for signature checks, with the one algorithm it allows."""

    algorithm: str
    key: Any


class KeySet(Mapping[str, VerifyKey]):
    """Immutable kid -> VerifyKey; kids are service names, looked up case-insensitively.

    A kid may hold more than one key while its service rotates: `candidates`
    gives them all (the mapping itself answers the first).
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, VerifyKey | tuple[VerifyKey, ...]]) -> None:
        folded: dict[str, tuple[VerifyKey, ...]] = {}
        for kid, key in keys.items():
            if kid.lower() in folded:
                raise ValueError(f"duplicate kid {kid.lower()!r} (kids compare case-insensitively)")
            held = key if isinstance(key, tuple) else (key,)
            if not held:
                raise ValueError(f"kid {kid.lower()!r} has no key")
            folded[kid.lower()] = held
        self._keys = MappingProxyType(folded)

    def __getitem__(self, kid: str) -> VerifyKey:
        return self._keys[kid.lower()][0]

    def candidates(self, kid: str) -> tuple[VerifyKey, ...]:
        """Every key of `kid` (old and new during a rotation); empty when it has none."""
        return self._keys.get(kid.lower(), ())

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, str) and kid.lower() in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeySet({sorted(self._keys)})"


def check_service_name(service: str) -> None:
    """Raise ValueError unless `service` is a service name (any letter case).

    A service name is also a file name here, so this keeps `../` and friends
    out of keygen's output paths.
    """
    if not names.is_service_name(service):
        raise ValueError(
            f"service name {service!r} is not a DNS label ({names.SERVICE_NAME_RULE})"
        )


# -- generating -------------------------------------------------------------


def generate(
    *,
    service: str,
    out_dir: str | Path,
    algorithm: str = Identity().algorithm,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write `out_dir/<service>.pem` (PKCS#8, mode 0600) and `<service>.jwks.json`.

    An existing private key is never replaced unless `overwrite` is set: losing
    it silently would lock the service out of the mesh.
    """
    check_service_name(service)
    private_key = _new_private_key(algorithm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pem_path = out / f"{service}.pem"
    jwks_path = out / f"{service}.jwks.json"
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(pem_path, pem, overwrite=overwrite)
    jwk = public_jwk(private_key.public_key(), kid=service, algorithm=algorithm)
    jwks_path.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n", encoding="utf-8")
    return pem_path, jwks_path


def _new_private_key(algorithm: str) -> Any:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    raise ValueError(
        f"unknown key algorithm {algorithm!r}; expected one of {', '.join(KEY_PAIR_ALGORITHMS)}"
    )


def public_jwk(public_key: Any, *, kid: str, algorithm: str) -> dict[str, Any]:
    """The JWK of a public key, with `kid`, `alg` and `use: sig`."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        material = OKPAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        material = ECAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, rsa.RSAPublicKey):
        material = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        raise ValueError(f"unsupported public key type {type(public_key).__name__}")
    material.pop("key_ops", None)  # `use` says the same; two ways to say it invite conflicts
    return {"kid": kid, "alg": algorithm, "use": "sig", **material}


# -- JWKS -------------------------------------------------------------------


def merge_jwks(dirs: Iterable[str | Path]) -> dict[str, Any]:
    """Merge every `*.jwks.json` directly in each dir into one JWKS, sorted by kid.

    The same key seen twice (say, one dir listed twice) is kept once; a kid
    with two different keys keeps both, in the order found: that is a key
    rotation, during which verifiers must accept either.
    """
    dir_list = list(dirs)
    by_kid: dict[str, list[dict[str, Any]]] = {}
    seen_files = 0
    for directory in dir_list:
        base = Path(directory)
        if not base.is_dir():
            raise KeyMaterialError(f"{base}: not a directory")
        for path in sorted(p for p in base.glob("*.jwks.json") if p.is_file()):
            seen_files += 1
            for jwk in _read_jwks(path):
                held = by_kid.setdefault(jwk["kid"].lower(), [])
                if all(_material(earlier) != _material(jwk) for earlier in held):
                    held.append(jwk)
    if seen_files == 0:
        raise KeyMaterialError("no *.jwks.json files in " + ", ".join(str(d) for d in dir_list))
    return {"keys": [jwk for kid in sorted(by_kid) for jwk in by_kid[kid]]}


def load_keyset(path: str | Path) -> KeySet:
    """Load a JWKS file into a KeySet, each key with the algorithm its material implies.

    A kid may appear more than once with different keys (a rotation: old and
    new); the very same key twice is kept once.
    """
    source = Path(path)
    keys: dict[str, list[VerifyKey]] = {}
    material: dict[str, list[Any]] = {}
    for jwk in _read_jwks(source):
        kid = jwk["kid"].lower()
        if _material(jwk) in material.setdefault(kid, []):
            continue
        material[kid].append(_material(jwk))
        keys.setdefault(kid, []).append(_verify_key(jwk, source))
    if not keys:
        raise KeyMaterialError(f"{source}: the JWKS holds no keys")
    return KeySet({kid: tuple(held) for kid, held in keys.items()})


def _read_jwks(path: Path) -> list[dict[str, Any]]:
    """Parse and check a JWKS file; every key in it is valid and public."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyMaterialError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyMaterialError(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyMaterialError(f'{path}: not a JWKS (expected {{"keys": [...]}})')
    keys: list[dict[str, Any]] = []
    for index, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            raise KeyMaterialError(f"{path}: keys[{index}] is not a JSON object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise KeyMaterialError(f"{path}: keys[{index}] has no kid (the service name)")
        _verify_key(jwk, path)
        keys.append(jwk)
    return keys


def _verify_key(jwk: dict[str, Any], source: Path) -> VerifyKey:
    where = f"{source}: kid {jwk['kid']!r}"
    if "d" in jwk:
        # A private key in a file meant to be shared is a leak; refuse it loudly.
        raise KeyMaterialError(f"{where} holds private key material; a JWKS must be public only")
    if jwk.get("use", "sig") != "sig":
        raise KeyMaterialError(f"{where} has use {jwk.get('use')!r}; only 'sig' keys verify tokens")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    parse: Callable[[dict[str, Any]], Any]
    key: Any
    if kty == "OKP" and crv == "Ed25519":
        algorithm, parse = "EdDSA", OKPAlgorithm.from_jwk
    elif kty == "EC" and crv == "P-256":
        algorithm, parse = "ES256", ECAlgorithm.from_jwk
    elif kty == "RSA":
        algorithm, parse = "RS256", RSAAlgorithm.from_jwk
    else:
        raise KeyMaterialError(
            f"{where} has unsupported key type {kty!r}/{crv!r}; "
            "expected OKP Ed25519, EC P-256 or RSA"
        )
    try:
        key = parse(jwk)
    except (InvalidKeyError, ValueError, TypeError, KeyError):
        raise KeyMaterialError(f"{where} is not a valid {kty} public key") from None
    if algorithm == "RS256" and key.key_size < MIN_RSA_BITS:
        raise KeyMaterialError(f"{where} is an RSA key below {MIN_RSA_BITS} bits")
    declared = jwk.get("alg")
    if declared is not None and declared != algorithm:
        raise KeyMaterialError(f"{where} says alg {declared!r} but its key is for {algorithm}")
    return VerifyKey(algorithm=algorithm, key=key)


def _material(jwk: dict[str, Any]) -> tuple[Any, ...]:
    kty = jwk.get("kty")
    return (kty, *(jwk.get(member) for member in _PUBLIC_MEMBERS.get(str(kty), ())))


# -- private keys and secrets ----------------------------------------------


def load_private_key(path: str | Path, algorithm: str) -> Any:
    """Load a PEM private key and check that it fits `algorithm`."""
    source = Path(path)
    if algorithm not in KEY_PAIR_ALGORITHMS:
        raise ValueError(
            f"algorithm {algorithm!r} has no private key file; "
            f"expected one of {', '.join(KEY_PAIR_ALGORITHMS)}"
        )
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"{source}: cannot read ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyMaterialError(f"{source}: the private key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyMaterialError(f"{source}: not a PEM private key") from None
    problem = private_key_problem(key, algorithm)
    if problem:
        raise KeyMaterialError(f"{source}: {problem}")
    return key


def private_key_problem(key: Any, algorithm: str) -> str | None:
    """Why `key` cannot sign with `algorithm`, or None when it can."""
    if algorithm == "EdDSA":
        ok = isinstance(key, ed25519.Ed25519PrivateKey)
        want = "an Ed25519 private key"
    elif algorithm == "ES256":
        ok = isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        want = "an EC P-256 private key"
    elif algorithm == "RS256":
        ok = isinstance(key, rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS
        want = f"an RSA private key of at least {MIN_RSA_BITS} bits"
    elif algorithm == SECRET_ALGORITHM:
        ok = isinstance(key, bytes) and len(key) >= MIN_SECRET_BYTES
        want = f"a secret of at least {MIN_SECRET_BYTES} bytes"
    else:
        return f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
    return None if ok else f"{algorithm} needs {want}, got {_describe(key)}"


def _describe(key: Any) -> str:
    if isinstance(key, bytes):
        return f"{len(key)} bytes"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA {key.key_size}-bit key"
    return f"a {type(key).__name__.lstrip('_')}"


def load_secret(path: str | Path) -> bytes:
    """Load the HS256 shared secret; trailing newlines (from `echo`) are not part of it."""
    source = Path(path)
    try:
        secret = source.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise KeyMaterialError(f"{source}: cannot read ({exc.strerror})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyMaterialError(
            f"{source}: the secret is {len(secret)} bytes; HS256 needs at least {MIN_SECRET_BYTES}"
        )
    return secret
