"""Key generation, JWKS merging and loading, private keys and secrets."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.identity.keys import (
    KeyMaterialError,
    KeySet,
    VerifyKey,
    generate,
    load_keyset,
    load_private_key,
    load_secret,
    merge_jwks,
    public_jwk,
)

SHAPES = {
    "EdDSA": {"kty": "OKP", "crv": "Ed25519"},
    "ES256": {"kty": "EC", "crv": "P-256"},
    "RS256": {"kty": "RSA"},
}


def write_jwks(path: Path, *jwks: dict[str, object]) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}))
    return path


def ed_jwk(kid: str) -> dict[str, object]:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return public_jwk(key, kid=kid, algorithm="EdDSA")


# -- generate ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(SHAPES))
def test_generate_writes_private_pem_and_public_jwks(tmp_path: Path, algorithm: str) -> None:
    pem, jwks = generate(service="billing-engine", out_dir=tmp_path / "keys", algorithm=algorithm)

    assert pem == tmp_path / "keys" / "billing-engine.pem"
    assert jwks == tmp_path / "keys" / "billing-engine.jwks.json"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted

    doc = json.loads(jwks.read_text())
    assert list(doc) == ["keys"] and len(doc["keys"]) == 1
    jwk = doc["keys"][0]
    assert jwk["kid"] == "billing-engine"
    assert jwk["alg"] == algorithm
    assert jwk["use"] == "sig"
    assert SHAPES[algorithm].items() <= jwk.items()
    assert "d" not in jwk

    # The two files are halves of one key pair.
    private = load_private_key(pem, algorithm)
    token = jwt.encode({"x": 1}, private, algorithm=algorithm)
    public = load_keyset(jwks)["billing-engine"]
    assert public.algorithm == algorithm
    assert jwt.decode(token, public.key, algorithms=[algorithm]) == {"x": 1}


def test_generate_default_is_eddsa(tmp_path: Path) -> None:
    _, jwks = generate(service="a", out_dir=tmp_path)
    assert json.loads(jwks.read_text())["keys"][0]["crv"] == "Ed25519"


def test_generate_unknown_algorithm_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HS512"):
        generate(service="a", out_dir=tmp_path, algorithm="HS512")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "-lead", "has space"])
def test_generate_rejects_names_that_are_not_service_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="DNS label"):
        generate(service=name, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_keeps_an_existing_private_key_unless_told(tmp_path: Path) -> None:
    pem, _ = generate(service="a", out_dir=tmp_path)
    before = pem.read_bytes()
    with pytest.raises(FileExistsError, match=r"a.pem"):
        generate(service="a", out_dir=tmp_path)
    assert pem.read_bytes() == before

    pem.chmod(0o644)
    generate(service="a", out_dir=tmp_path, overwrite=True)
    assert pem.read_bytes() != before
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600


# -- merge_jwks -------------------------------------------------------------


def test_merge_takes_every_jwks_file_directly_in_each_dir_sorted_by_kid(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    generate(service="zeta", out_dir=one)
    generate(service="alpha", out_dir=one, algorithm="ES256")
    generate(service="mid", out_dir=two)
    generate(service="nested", out_dir=two / "sub")  # not recursive
    (two / "notes.json").write_text("{}")  # only *.jwks.json counts

    merged = merge_jwks([one, str(two)])

    assert [k["kid"] for k in merged["keys"]] == ["alpha", "mid", "zeta"]
    assert list(merged) == ["keys"]
    out = write_jwks(tmp_path / "mesh.json", *merged["keys"])
    assert sorted(load_keyset(out)) == ["alpha", "mid", "zeta"]


def test_merge_keeps_both_keys_of_a_rotating_kid(tmp_path: Path) -> None:
    # Issue 9: a JWKS must hold a service's old and new keys while it rotates
    # (kid is the service name, so both share it). This replaced the rule
    # that refused one kid with two keys.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old, new = ed_jwk("billing"), ed_jwk("Billing")
    write_jwks(tmp_path / "a" / "x.jwks.json", old)
    write_jwks(tmp_path / "b" / "y.jwks.json", new)

    merged = merge_jwks([tmp_path / "a", tmp_path / "b", tmp_path / "a"])
    assert merged["keys"] == [old, new]
    keys = load_keyset(write_jwks(tmp_path / "mesh.json", *merged["keys"]))
    assert len(keys.candidates("billing")) == 2


def test_merge_keeps_the_same_key_once(tmp_path: Path) -> None:
    generate(service="a", out_dir=tmp_path)
    merged = merge_jwks([tmp_path, tmp_path])
    assert len(merged["keys"]) == 1


def test_merge_reports_missing_dirs_and_empty_input(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="not a directory"):
        merge_jwks([tmp_path / "absent"])
    with pytest.raises(KeyMaterialError, match=r"no \*.jwks.json"):
        merge_jwks([tmp_path])


def test_merge_rejects_a_broken_file_naming_it(tmp_path: Path) -> None:
    (tmp_path / "bad.jwks.json").write_text("{not json")
    with pytest.raises(KeyMaterialError, match=r"bad.jwks.json: not valid JSON"):
        merge_jwks([tmp_path])


# -- load_keyset --------------------------------------------------------------


def test_keyset_algorithm_comes_from_the_key_material(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwks = [
        {k: v for k, v in public_jwk(rsa_key, kid="r", algorithm="RS256").items() if k != "alg"},
        {k: v for k, v in public_jwk(ec_key, kid="e", algorithm="ES256").items() if k != "alg"},
        {k: v for k, v in ed_jwk("o").items() if k != "alg"},
    ]
    keys = load_keyset(write_jwks(tmp_path / "j.json", *jwks))

    assert {kid: keys[kid].algorithm for kid in keys} == {"r": "RS256", "e": "ES256", "o": "EdDSA"}
    assert isinstance(keys["r"].key, rsa.RSAPublicKey)
    assert isinstance(keys["e"].key, ec.EllipticCurvePublicKey)
    assert isinstance(keys["o"].key, ed25519.Ed25519PublicKey)


def test_keyset_kids_compare_case_insensitively(tmp_path: Path) -> None:
    keys = load_keyset(write_jwks(tmp_path / "j.json", ed_jwk("Billing-Engine")))
    assert list(keys) == ["billing-engine"]
    assert "BILLING-engine" in keys
    assert keys["BILLING-ENGINE"] is keys["billing-engine"]
    assert keys.get("other") is None


def test_keyset_is_immutable() -> None:
    keys = KeySet({"a": VerifyKey("EdDSA", object())})
    with pytest.raises(TypeError):
        keys["b"] = VerifyKey("EdDSA", object())  # type: ignore[index]
    with pytest.raises(ValueError, match="duplicate kid"):
        KeySet({"a": VerifyKey("EdDSA", 1), "A": VerifyKey("EdDSA", 2)})


def test_keyset_rejects_an_alg_that_contradicts_the_key(tmp_path: Path) -> None:
    jwk = {**ed_jwk("billing"), "alg": "RS256"}
    path = write_jwks(tmp_path / "j.json", jwk)
    with pytest.raises(KeyMaterialError, match=r"j.json.*'billing'.*RS256"):
        load_keyset(path)


def test_keyset_rejects_private_key_material_without_echoing_it(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    jwk = {"kid": "billing", **jwt.algorithms.OKPAlgorithm.to_jwk(private, as_dict=True)}
    path = write_jwks(tmp_path / "j.json", jwk)
    with pytest.raises(KeyMaterialError, match="private key material") as err:
        load_keyset(path)
    assert jwk["d"] not in str(err.value)
    assert jwk["x"] not in str(err.value)


@pytest.mark.parametrize(
    ("jwk", "problem"),
    [
        ({"kid": "a", "kty": "oct", "k": "c2VjcmV0"}, "unsupported key type"),
        ({"kid": "a", "kty": "OKP", "crv": "X25519", "x": "AAAA"}, "unsupported key type"),
        ({"kid": "a", "kty": "OKP", "crv": "Ed25519", "x": "!!"}, "not a valid OKP"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}, "has no kid"),
        ({**ed_jwk("a"), "use": "enc"}, "use 'enc'"),
    ],
)
def test_keyset_rejects_unusable_keys(tmp_path: Path, jwk: dict[str, object], problem: str) -> None:
    with pytest.raises(KeyMaterialError, match=problem):
        load_keyset(write_jwks(tmp_path / "j.json", jwk))


def test_keyset_rejects_other_curves_and_short_rsa(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    jwk = public_jwk(p384, kid="a", algorithm="ES384")
    with pytest.raises(KeyMaterialError, match="unsupported key type 'EC'/'P-384'"):
        load_keyset(write_jwks(tmp_path / "j.json", jwk))

    short = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    jwk = public_jwk(short, kid="a", algorithm="RS256")
    with pytest.raises(KeyMaterialError, match="below 2048 bits"):
        load_keyset(write_jwks(tmp_path / "j.json", jwk))


def test_keyset_keeps_rotating_keys_and_the_same_key_once(tmp_path: Path) -> None:
    # Issue 9: old and new keys of one service (one kid) are both trusted
    # during a rotation; the very same key listed twice is one key.
    old, new = ed_jwk("a"), ed_jwk("A")
    keys = load_keyset(write_jwks(tmp_path / "j.json", old, new, old))
    assert len(keys.candidates("a")) == 2 and list(keys) == ["a"]
    assert keys.candidates("other") == ()


def test_keyset_rejects_empty_sets_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="no keys"):
        load_keyset(write_jwks(tmp_path / "j.json"))
    (tmp_path / "j.json").write_text('["keys"]')
    with pytest.raises(KeyMaterialError, match="not a JWKS"):
        load_keyset(tmp_path / "j.json")
    with pytest.raises(KeyMaterialError, match=r"missing.json: cannot read"):
        load_keyset(tmp_path / "missing.json")


# -- private keys and secrets -------------------------------------------------


def test_private_key_must_fit_the_algorithm(tmp_path: Path) -> None:
    pem, _ = generate(service="a", out_dir=tmp_path)  # Ed25519
    with pytest.raises(KeyMaterialError, match=r"a.pem: ES256 needs an EC P-256 private key"):
        load_private_key(pem, "ES256")
    with pytest.raises(KeyMaterialError, match="RS256 needs an RSA private key"):
        load_private_key(pem, "RS256")
    with pytest.raises(ValueError, match="no private key file"):
        load_private_key(pem, "HS256")
    assert isinstance(load_private_key(pem, "EdDSA"), ed25519.Ed25519PrivateKey)


def test_private_key_problems_name_the_file_not_the_key(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyMaterialError, match=r"garbage.pem: not a PEM private key") as err:
        load_private_key(garbage, "EdDSA")
    assert "AAAA" not in str(err.value)

    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(KeyMaterialError, match=r"locked.pem: the private key is encrypted"):
        load_private_key(locked, "EdDSA")

    with pytest.raises(KeyMaterialError, match=r"absent.pem: cannot read"):
        load_private_key(tmp_path / "absent.pem", "EdDSA")


def test_p384_key_is_not_es256(tmp_path: Path) -> None:
    path = tmp_path / "p384.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyMaterialError, match="got an EC secp384r1 key"):
        load_private_key(path, "ES256")


def test_secret_strips_trailing_newline_and_needs_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "mesh.secret"
    path.write_bytes(b"s" * 32 + b"\n")
    assert load_secret(path) == b"s" * 32

    path.write_bytes(b"s" * 31 + b"\r\n")
    with pytest.raises(KeyMaterialError, match=r"mesh.secret: the secret is 31 bytes") as err:
        load_secret(path)
    assert "sss" not in str(err.value)

    with pytest.raises(KeyMaterialError, match="cannot read"):
        load_secret(tmp_path / "absent")
