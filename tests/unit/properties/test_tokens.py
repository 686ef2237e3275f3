"""Token verification on arbitrary input: only TokenError, and success only by the rules.

Garbage tokens test the parsing; tokens signed with the mesh's real key (or
the HS256 secret) carrying arbitrary headers and claims test every check
behind the signature, where only a mesh member could send them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import event, given
from hypothesis import strategies as st

from sidecar.clock import FakeClock
from sidecar.identity.keys import KeySet, VerifyKey
from sidecar.identity.tokens import TokenError, Verifier
from tests.unit.properties.strategies import edge_numbers, edge_text, json_values

TARGET, CALLER = "billing", "caller"
SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000.0
SKEW, MAX_TTL = 30.0, 300.0
KEY = ed25519.Ed25519PrivateKey.generate()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def text_of(part: Any) -> bytes:
    return part if isinstance(part, bytes) else json.dumps(part).encode()


def hs256(header: Any, payload: Any) -> str:
    signing_input = f"{b64(text_of(header))}.{b64(text_of(payload))}"
    mac = hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def eddsa(header: Any, payload: Any) -> str:
    signing_input = f"{b64(text_of(header))}.{b64(text_of(payload))}"
    return f"{signing_input}.{b64(KEY.sign(signing_input.encode()))}"


def verifiers() -> dict[str, Verifier]:
    clock = FakeClock(wall=NOW)
    keys = KeySet({CALLER: VerifyKey("EdDSA", KEY.public_key())})
    common: dict[str, Any] = {"service": TARGET, "max_ttl": MAX_TTL, "skew": SKEW,
                              "clock": clock, "cache_size": 0}
    return {"HS256": Verifier(secret=SECRET, **common), "EdDSA": Verifier(keys=keys, **common)}


VERIFIERS = verifiers()
SIGN = {"HS256": hs256, "EdDSA": eddsa}


def mostly(good: list[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually one of the `good` values, so the checks behind them are reached too."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), hostile)


_header = st.fixed_dictionaries(
    {"alg": mostly(["HS256", "EdDSA"], st.sampled_from(["none", "RS256", "hs256"])),
     "kid": mostly([CALLER, "Caller"],
                   st.one_of(st.sampled_from(["\u212aaller", ""]), json_values))},
    optional={"typ": json_values})
headers = st.one_of(_header, _header, json_values)
_claims = st.fixed_dictionaries(
    {"iss": mostly([CALLER, "CALLER"], st.one_of(st.just("other"), edge_text)),
     "aud": mostly([TARGET, [TARGET]], st.one_of(st.just([TARGET, "x"]), json_values)),
     "iat": mostly([NOW, NOW - 10, NOW + SKEW], st.one_of(st.just(NOW + 31), edge_numbers)),
     "exp": mostly([NOW + 60, NOW - SKEW, NOW + MAX_TTL],
                   st.one_of(st.just(NOW - 31), edge_numbers))},
    optional={"nbf": edge_numbers, "sub": json_values, "jti": json_values})
claims = st.one_of(_claims, _claims, json_values)

def check(verifier: Verifier, token: str, header: Any, payload: Any) -> None:
    try:
        caller = verifier.verify(token)
    except TokenError as exc:
        assert exc.check and exc.message
        event(f"refused: {exc.check}")
        return
    event("accepted")
    # Success only when every rule of SPEC's "Identity tokens" holds.
    assert caller == CALLER
    assert isinstance(header, dict) and header["kid"].lower() == CALLER
    assert not {"crit", "jku", "x5u", "jwk", "x5c"} & set(header)
    assert isinstance(payload, dict) and payload["iss"].lower() == CALLER
    aud = payload["aud"]
    assert aud == TARGET or aud == [TARGET]
    iat, exp = payload["iat"], payload["exp"]
    assert not isinstance(iat, bool) and not isinstance(exp, bool)
    assert iat <= NOW + SKEW and exp >= NOW - SKEW and exp - iat <= MAX_TTL
    if payload.get("nbf") is not None:
        assert payload["nbf"] <= NOW + SKEW


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 st.lists(st.text(alphabet="abcXYZ019-_=+/", max_size=40), max_size=5)
                 .map(".".join)))
def test_garbage_is_a_token_error(token: str) -> None:
    for verifier in VERIFIERS.values():
        with pytest.raises(TokenError):
            verifier.verify(token)


@given(st.sampled_from(sorted(SIGN)), headers, claims)
def test_signed_tokens_with_arbitrary_contents_pass_only_by_the_rules(
    algorithm: str, header: Any, payload: Any
) -> None:
    if isinstance(header, dict) and isinstance(header.get("alg"), str) and header["alg"] in SIGN:
        header = {**header, "alg": algorithm}
    token = SIGN[algorithm](header, payload)
    check(VERIFIERS[algorithm], token, header, payload)


@given(st.sampled_from(sorted(SIGN)), st.sampled_from(["exp", "iat", "nbf"]),
       st.sampled_from(["1" + "0" * 400, "-1" + "0" * 400, "1e400", "NaN", "Infinity",
                        "-Infinity", "9" * 5000, "true", "null", "[]", "{}", '"1"']))
def test_time_claims_as_any_json_number_text_are_checked_not_crashed(
    algorithm: str, claim: str, literal: str
) -> None:
    members = {"iss": json.dumps(CALLER), "aud": json.dumps(TARGET), "iat": str(int(NOW)),
               "exp": str(int(NOW) + 60), claim: literal}
    payload = ("{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}").encode()
    header = {"alg": algorithm, "kid": CALLER}
    try:
        VERIFIERS[algorithm].verify(SIGN[algorithm](header, payload))
    except TokenError:
        return
    assert (claim, literal) == ("nbf", "null")  # an absent nbf: nothing to check
