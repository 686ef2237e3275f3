"""Minting and verifying identity tokens, on a fake clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sidecar.clock import FakeClock
from sidecar.identity.keys import (
    KeySet,
    VerifyKey,
    generate,
    load_keyset,
    load_private_key,
    merge_jwks,
)
from sidecar.identity.tokens import Minter, TokenError, Verifier

TARGET = "billing-engine"
SECRET = b"0123456789abcdef0123456789abcdef-mesh"
TTL, MAX_TTL, SKEW = 60.0, 300.0, 30.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One key pair per algorithm, each a service, and the mesh JWKS."""
    out = tmp_path_factory.mktemp("keys")
    private = {}
    for service, algorithm in [("ed", "EdDSA"), ("ec", "ES256"), ("rs", "RS256")]:
        pem, _ = generate(service=service, out_dir=out, algorithm=algorithm)
        private[service] = load_private_key(pem, algorithm)
    jwks = out / "mesh.json"
    jwks.write_text(json.dumps(merge_jwks([out])))
    return {"private": private, "keys": load_keyset(jwks), "dir": out}


def verifier(mesh: dict[str, Any], clock: FakeClock, **overrides: Any) -> Verifier:
    settings: dict[str, Any] = {
        "service": TARGET,
        "keys": mesh["keys"],
        "max_ttl": MAX_TTL,
        "skew": SKEW,
        "clock": clock,
    }
    return Verifier(**{**settings, **overrides})


def now(clock: FakeClock) -> int:
    return int(clock.time())


def claims(clock: FakeClock, iss: str = "ed", **changes: Any) -> dict[str, Any]:
    """Valid claims for a call from `iss` to TARGET; a change of None drops the claim."""
    base = {"iss": iss, "sub": iss, "aud": TARGET, "iat": now(clock), "exp": now(clock) + 60}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(
    mesh: dict[str, Any], payload: dict[str, Any], *, service: str = "ed", **hdr: Any
) -> str:
    algorithm = {"ed": "EdDSA", "ec": "ES256", "rs": "RS256"}[service]
    headers = {"kid": service, **hdr}
    return jwt.encode(payload, mesh["private"][service], algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HS256 without PyJWT, which refuses a PEM as an HMAC secret (as it should)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def rejected(v: Verifier, token: str) -> str:
    with pytest.raises(TokenError) as err:
        v.verify(token)
    for part in token.split("."):
        if len(part) > 3:
            assert part not in str(err.value)
    return err.value.check


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("service", ["ed", "ec", "rs"])
def test_minted_tokens_verify_for_every_key_algorithm(
    mesh: dict[str, Any], clock: FakeClock, service: str
) -> None:
    algorithm = mesh["keys"][service].algorithm
    minter = Minter(
        service=service, algorithm=algorithm, key=mesh["private"][service], ttl=TTL, clock=clock
    )
    token = minter.token_for(TARGET)

    assert jwt.get_unverified_header(token)["alg"] == algorithm
    assert verifier(mesh, clock).verify(token) == service


def test_hs256_round_trip_with_the_shared_secret(clock: FakeClock) -> None:
    minter = Minter(service="caller", algorithm="HS256", key=SECRET, ttl=TTL, clock=clock)
    v = Verifier(service=TARGET, secret=SECRET, max_ttl=MAX_TTL, skew=SKEW, clock=clock)
    token = minter.token_for(TARGET)
    assert v.verify(token) == "caller"

    other = Verifier(service=TARGET, secret=SECRET[::-1], max_ttl=MAX_TTL, skew=SKEW, clock=clock)
    assert rejected(other, token) == "signature"


def test_hs256_still_needs_kid_equal_to_iss(clock: FakeClock) -> None:
    v = Verifier(service=TARGET, secret=SECRET, max_ttl=MAX_TTL, skew=SKEW, clock=clock)
    token = jwt.encode(claims(clock, iss="other"), SECRET, algorithm="HS256", headers={"kid": "me"})
    assert rejected(v, token) == "kid_not_issuer"
    token = jwt.encode(claims(clock), SECRET, algorithm="HS256")  # no kid
    assert rejected(v, token) == "kid_missing"
    # An EdDSA token means nothing to an HS256 mesh.
    assert (
        rejected(
            v,
            jwt.encode(
                claims(clock, iss="x"),
                ed25519.Ed25519PrivateKey.generate(),
                algorithm="EdDSA",
                headers={"kid": "x"},
            ),
        )
        == "algorithm"
    )


def test_hs256_caller_must_be_a_service_name(clock: FakeClock) -> None:
    v = Verifier(service=TARGET, secret=SECRET, max_ttl=MAX_TTL, skew=SKEW, clock=clock)
    bad = "evil\r\nx-source-service: admin"
    token = jwt.encode(claims(clock, iss=bad), SECRET, algorithm="HS256", headers={"kid": bad})
    assert rejected(v, token) == "kid_unknown"
    # The kid is a name, and the iss case-folds onto it without being one.
    token = jwt.encode(claims(clock, iss="\u212aey"), SECRET, algorithm="HS256",
                       headers={"kid": "key"})
    assert rejected(v, token) == "issuer"


def test_caller_name_is_lowercased_and_audience_case_insensitive(
    mesh: dict[str, Any], clock: FakeClock
) -> None:
    token = signed(mesh, claims(clock, iss="ED", aud="Billing-Engine"), kid="Ed")
    assert verifier(mesh, clock).verify(token) == "ed"


# -- header rules -----------------------------------------------------------------


def test_alg_none_is_rejected(mesh: dict[str, Any], clock: FakeClock) -> None:
    token = jwt.encode(claims(clock), None, algorithm="none", headers={"kid": "ed"})
    assert rejected(verifier(mesh, clock), token) == "algorithm"


@pytest.mark.parametrize("service", ["rs", "ec", "ed"])
def test_hs256_signed_with_the_public_key_as_secret_is_rejected(
    mesh: dict[str, Any], clock: FakeClock, service: str
) -> None:
    public_pem = mesh["keys"][service].key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hs256_by_hand(
        {"alg": "HS256", "typ": "JWT", "kid": service}, claims(clock, iss=service), public_pem
    )
    assert rejected(verifier(mesh, clock), token) == "algorithm"


def test_token_alg_must_match_the_keys_algorithm(mesh: dict[str, Any], clock: FakeClock) -> None:
    # Signed by ec's ES256 key but claiming to be rs (an RS256 key).
    token = jwt.encode(
        claims(clock, iss="rs"), mesh["private"]["ec"], algorithm="ES256", headers={"kid": "rs"}
    )
    assert rejected(verifier(mesh, clock), token) == "algorithm"


def test_one_services_key_cannot_speak_for_another_kid(
    mesh: dict[str, Any], clock: FakeClock
) -> None:
    token = jwt.encode(
        claims(clock, iss="ec"), mesh["private"]["ed"], algorithm="EdDSA", headers={"kid": "ec"}
    )
    assert rejected(verifier(mesh, clock), token) == "algorithm"
    # Two EdDSA services: the alg matches, so only the signature can tell.
    other = ed25519.Ed25519PrivateKey.generate()
    keys = KeySet({**mesh["keys"], "ed2": VerifyKey("EdDSA", other.public_key())})
    token = signed(mesh, claims(clock, iss="ed2"), kid="ed2")
    assert rejected(verifier(mesh, clock, keys=keys), token) == "signature"


def test_kid_must_equal_iss(mesh: dict[str, Any], clock: FakeClock) -> None:
    token = signed(mesh, claims(clock, iss="ec"))  # ed's key and kid, ec's name
    assert rejected(verifier(mesh, clock), token) == "kid_not_issuer"
    assert rejected(verifier(mesh, clock), signed(mesh, claims(clock, iss=None))) == (
        "kid_not_issuer"
    )


def test_kid_unknown_and_missing(mesh: dict[str, Any], clock: FakeClock) -> None:
    token = signed(mesh, claims(clock, iss="stranger"), kid="stranger")
    assert rejected(verifier(mesh, clock), token) == "kid_unknown"
    token = jwt.encode(claims(clock), mesh["private"]["ed"], algorithm="EdDSA")
    assert rejected(verifier(mesh, clock), token) == "kid_missing"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("crit", ["exp"]),
        ("jku", "https://attacker.example/jwks.json"),
        ("x5u", "https://attacker.example/cert.pem"),
        ("jwk", {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}),
        ("x5c", ["MIIB"]),
    ],
)
def test_headers_that_point_at_key_material_are_rejected(
    mesh: dict[str, Any], clock: FakeClock, name: str, value: Any
) -> None:
    token = signed(mesh, claims(clock), **{name: value})
    assert rejected(verifier(mesh, clock), token) == "forbidden_header"


# -- signature and shape --------------------------------------------------------------


def test_tampered_signature_and_payload_are_rejected(
    mesh: dict[str, Any], clock: FakeClock
) -> None:
    token = signed(mesh, claims(clock))
    head, body, sig = token.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert rejected(verifier(mesh, clock), f"{head}.{body}.{flipped}") == "signature"

    forged_body = b64(json.dumps(claims(clock, exp=now(clock) + 10)).encode())
    assert rejected(verifier(mesh, clock), f"{head}.{forged_body}.{sig}") == "signature"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "x" * 10_000,
        b64(b"not json") + ".e30.x",
        b64(b"[" * 5000) + ".e30.x",
        b64(b"[1]") + ".e30.x",
    ],
)
def test_garbage_is_malformed(mesh: dict[str, Any], clock: FakeClock, token: str) -> None:
    assert rejected(verifier(mesh, clock), token) == "malformed"


# -- audience -------------------------------------------------------------------------


def test_audience_may_be_a_list_holding_only_this_service(
    mesh: dict[str, Any], clock: FakeClock
) -> None:
    assert verifier(mesh, clock).verify(signed(mesh, claims(clock, aud=[TARGET]))) == "ed"


@pytest.mark.parametrize(
    "aud", [[TARGET, "other"], ["other", TARGET], "other", [], None, 7, [7], "billing"]
)
def test_audience_must_be_this_service(mesh: dict[str, Any], clock: FakeClock, aud: Any) -> None:
    token = signed(mesh, claims(clock, aud=aud))
    assert rejected(verifier(mesh, clock), token) == "audience"


# -- time -----------------------------------------------------------------------------


def test_exp_and_iat_must_be_present_numbers(mesh: dict[str, Any], clock: FakeClock) -> None:
    v = verifier(mesh, clock)
    assert rejected(v, signed(mesh, claims(clock, exp=None))) == "missing_exp"
    assert rejected(v, signed(mesh, claims(clock, iat=None))) == "missing_iat"
    assert rejected(v, signed(mesh, claims(clock, exp="soon"))) == "malformed"
    assert rejected(v, signed(mesh, claims(clock, iat=True))) == "malformed"


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), float("inf"), float("-inf"), float("nan"), 1e308, -1, 253_402_300_800],
    ids=["huge", "-huge", "inf", "-inf", "nan", "1e308", "negative", "year-10000"],
)
def test_time_claims_out_of_range_fail_the_check(
    mesh: dict[str, Any], clock: FakeClock, claim: str, value: Any
) -> None:
    # Signed by a mesh key, so only the claim checks stand between it and the app.
    token = signed(mesh, claims(clock, **{claim: value}))
    assert rejected(verifier(mesh, clock), token) == "malformed"


def test_a_kid_that_only_case_folds_onto_a_service_is_unknown(
    mesh: dict[str, Any], clock: FakeClock
) -> None:
    # "\u212a" (KELVIN SIGN) lower-cases to "k", so "\u212ad" would find kd's key.
    keys = KeySet({**mesh["keys"], "kd": mesh["keys"]["ed"]})
    token = signed(mesh, claims(clock, iss="kd"), kid="\u212ad")
    assert rejected(verifier(mesh, clock, keys=keys), token) == "kid_unknown"
    assert verifier(mesh, clock, keys=keys).verify(
        signed(mesh, claims(clock, iss="kd"), kid="KD")) == "kd"


def test_exp_may_be_past_only_by_the_skew(mesh: dict[str, Any], clock: FakeClock) -> None:
    t = now(clock)
    v = verifier(mesh, clock)
    assert v.verify(signed(mesh, claims(clock, iat=t - 90, exp=t - 30))) == "ed"
    assert rejected(v, signed(mesh, claims(clock, iat=t - 91, exp=t - 31))) == "expired"


def test_iat_may_be_future_only_by_the_skew(mesh: dict[str, Any], clock: FakeClock) -> None:
    t = now(clock)
    v = verifier(mesh, clock)
    assert v.verify(signed(mesh, claims(clock, iat=t + 30, exp=t + 90))) == "ed"
    assert rejected(v, signed(mesh, claims(clock, iat=t + 31, exp=t + 91))) == "not_yet_valid"
    assert rejected(v, signed(mesh, claims(clock, nbf=t + 31))) == "not_yet_valid"


def test_lifetime_over_max_ttl_is_rejected(mesh: dict[str, Any], clock: FakeClock) -> None:
    t = now(clock)
    v = verifier(mesh, clock)
    assert v.verify(signed(mesh, claims(clock, iat=t, exp=t + 300))) == "ed"
    assert rejected(v, signed(mesh, claims(clock, iat=t, exp=t + 301))) == "ttl_too_long"


def test_a_remembered_token_still_expires(mesh: dict[str, Any], clock: FakeClock) -> None:
    v = verifier(mesh, clock)
    token = signed(mesh, claims(clock))  # exp = now + 60
    assert v.verify(token) == "ed"
    clock.advance(60 + 30)
    assert v.verify(token) == "ed"  # exp + skew exactly: still valid
    clock.advance(1)
    assert rejected(v, token) == "expired"


def test_a_remembered_token_belongs_to_its_verifier(mesh: dict[str, Any], clock: FakeClock) -> None:
    # The cache stores successes only; a failure is checked afresh every time.
    v = verifier(mesh, clock)
    token = signed(mesh, claims(clock, iat=now(clock) + 40, exp=now(clock) + 100))
    assert rejected(v, token) == "not_yet_valid"
    clock.advance(10)
    assert v.verify(token) == "ed"


def test_verifier_names_its_service_lowercased(mesh: dict[str, Any], clock: FakeClock) -> None:
    assert verifier(mesh, clock, service="Billing-Engine").service == TARGET


@pytest.mark.parametrize(
    "settings", [{"max_ttl": float("nan")}, {"max_ttl": float("inf")}, {"skew": float("nan")}]
)
def test_verifier_refuses_settings_that_would_turn_a_check_off(
    mesh: dict[str, Any], settings: dict[str, float]
) -> None:
    with pytest.raises(ValueError, match="finite"):
        Verifier(**{"service": TARGET, "keys": mesh["keys"], "max_ttl": MAX_TTL,
                    "skew": SKEW, **settings})


def test_verifier_needs_exactly_one_key_source(mesh: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Verifier(service=TARGET, max_ttl=MAX_TTL, skew=SKEW)
    with pytest.raises(ValueError, match="exactly one"):
        Verifier(service=TARGET, keys=mesh["keys"], secret=SECRET, max_ttl=MAX_TTL, skew=SKEW)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Verifier(service=TARGET, secret=b"short", max_ttl=MAX_TTL, skew=SKEW)


# -- minter ---------------------------------------------------------------------------


def decoded(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def test_minted_claims_and_header(mesh: dict[str, Any], clock: FakeClock) -> None:
    minter = Minter(
        service="ed", algorithm="EdDSA", key=mesh["private"]["ed"], ttl=TTL, clock=clock
    )
    header, body = decoded(minter.token_for(TARGET))

    assert minter.service == "ed"
    assert header["kid"] == "ed" and header["alg"] == "EdDSA"
    assert body["iss"] == "ed" and body["sub"] == "ed" and body["aud"] == TARGET
    assert body["iat"] == 1_700_000_000 and body["exp"] == 1_700_000_060
    assert isinstance(body["iat"], int) and isinstance(body["exp"], int)
    # jti is uuid4().hex: 32 lowercase hex digits of a random (version 4) UUID,
    jti = body["jti"]
    assert re.fullmatch(r"[0-9a-f]{32}", jti)
    assert uuid.UUID(hex=jti).version == 4 and uuid.UUID(hex=jti).variant == uuid.RFC_4122
    # fresh for every token: another minter with the same key, clock and audience
    # signs the very same claims but for jti.
    twin = Minter(service="ed", algorithm="EdDSA", key=mesh["private"]["ed"], ttl=TTL, clock=clock)
    twin_body = decoded(twin.token_for(TARGET))[1]
    assert {k: v for k, v in twin_body.items() if k != "jti"} == {
        k: v for k, v in body.items() if k != "jti"
    }
    assert twin_body["jti"] != jti


def test_sub_is_the_spiffe_id_with_a_trust_domain(mesh: dict[str, Any], clock: FakeClock) -> None:
    minter = Minter(
        service="ed",
        algorithm="EdDSA",
        key=mesh["private"]["ed"],
        ttl=TTL,
        trust_domain="intelluxe.local",
        clock=clock,
    )
    token = minter.token_for(TARGET)
    assert decoded(token)[1]["sub"] == "spiffe://intelluxe.local/ed"
    assert verifier(mesh, clock).verify(token) == "ed"


def test_token_is_reused_until_80_percent_of_its_ttl(
    mesh: dict[str, Any], clock: FakeClock
) -> None:
    minter = Minter(
        service="ed", algorithm="EdDSA", key=mesh["private"]["ed"], ttl=TTL, clock=clock
    )
    first = minter.token_for(TARGET)
    clock.advance(47.9)
    assert minter.token_for(TARGET) == first
    clock.advance(0.1)  # 48s = 80% of 60s
    second = minter.token_for(TARGET)
    assert second != first
    assert decoded(second)[1]["iat"] == 1_700_000_048
    assert minter.token_for(TARGET) == second


def test_each_audience_gets_its_own_token(mesh: dict[str, Any], clock: FakeClock) -> None:
    minter = Minter(
        service="ed", algorithm="EdDSA", key=mesh["private"]["ed"], ttl=TTL, clock=clock
    )
    a, b = minter.token_for("svc-a"), minter.token_for("svc-b")
    assert a != b
    assert decoded(a)[1]["aud"] == "svc-a" and decoded(b)[1]["aud"] == "svc-b"
    assert decoded(a)[1]["jti"] != decoded(b)[1]["jti"]
    assert minter.token_for("svc-a") == a


def test_minter_checks_its_key_and_ttl(mesh: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="ES256 needs an EC P-256 private key"):
        Minter(service="ed", algorithm="ES256", key=mesh["private"]["ed"], ttl=TTL)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Minter(service="ed", algorithm="HS256", key=b"short", ttl=TTL)
    with pytest.raises(ValueError, match="ttl"):
        Minter(service="ed", algorithm="EdDSA", key=mesh["private"]["ed"], ttl=0.5)
    with pytest.raises(ValueError, match="ttl"):
        Minter(service="ed", algorithm="EdDSA", key=mesh["private"]["ed"], ttl=float("inf"))


def test_a_rotating_service_is_trusted_with_old_and_new_keys_only(
    mesh: dict[str, Any], clock: FakeClock, tmp_path: Path
) -> None:
    # The JWKS holds ed's old key and a new one (both kid "ed"): either verifies,
    # a third key of the same kid does not, and the old key goes with its entry.
    new_pem, _ = generate(service="ed", out_dir=tmp_path / "new", algorithm="EdDSA")
    stray_pem, _ = generate(service="ed", out_dir=tmp_path / "stray", algorithm="EdDSA")
    merged = merge_jwks([mesh["dir"], tmp_path / "new"])
    both = tmp_path / "both.json"
    both.write_text(json.dumps(merged))
    rotating = verifier(mesh, clock, keys=load_keyset(both))
    new_key = load_private_key(new_pem, "EdDSA")
    stray_key = load_private_key(stray_pem, "EdDSA")
    old_token = signed(mesh, claims(clock))
    new_token = jwt.encode(claims(clock), new_key, algorithm="EdDSA", headers={"kid": "ed"})
    stray = jwt.encode(claims(clock), stray_key, algorithm="EdDSA", headers={"kid": "ed"})
    assert rotating.verify(old_token) == "ed"
    assert rotating.verify(new_token) == "ed"
    assert rejected(rotating, stray) == "signature"
    only_new = tmp_path / "new.json"
    only_new.write_text(json.dumps(merge_jwks([tmp_path / "new"])))
    assert rejected(verifier(mesh, clock, keys=load_keyset(only_new)), old_token) == "signature"
