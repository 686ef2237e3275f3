"""Service identity: key material, and the tokens that carry a caller's name."""

from sidecar.identity.keys import (
    KeyMaterialError,
    KeySet,
    VerifyKey,
    generate,
    load_keyset,
    load_private_key,
    load_secret,
    merge_jwks,
)
from sidecar.identity.tokens import Minter, TokenError, Verifier

__all__ = [
    "KeyMaterialError",
    "KeySet",
    "Minter",
    "TokenError",
    "Verifier",
    "VerifyKey",
    "generate",
    "load_keyset",
    "load_private_key",
    "load_secret",
    "merge_jwks",
]
