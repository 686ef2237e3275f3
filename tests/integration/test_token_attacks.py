"""Forged, bent and misplaced identity tokens against one real inbound sidecar.

Every attack must be answered 401 (431 for a token too large for a header),
reach nothing behind the sidecar, leave a `denied` audit record, fetch
nothing (the canary counts connections to every URL a token points at), and
leave the sidecar serving the next valid call.

The caller is `kiosk` (the policy allows it `/claims/*`); `other` is a mesh
service too, whose key is in the JWKS. Tokens are made by hand, byte for
byte, just before they are sent, with times in whole seconds 1 s either side
of the sidecar's 30 s `clock_skew`. The sidecar reads its clock after the
test did: that only helps a time already past the boundary (an `exp` beyond
the skew, an `iat` or `nbf` within it), which are rounded down; the others (an
`exp` within the skew, an `iat` or `nbf` beyond it) are rounded up and set
MARGIN (2 s) out, so they still land on their side if the sidecar reads its
clock up to MARGIN seconds later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from deploy.process import SidecarProcess
from sidecar.identity.keys import load_private_key, public_jwk
from tests.support.audit import read_records
from tests.support.hostile import (
    Answer,
    Canary,
    audit_record_after,
    exchange,
    request,
)
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

CALLER, TARGET, OTHER = "kiosk", "b", "other"
SKEW, MAX_TTL = 30, 300
MARGIN = 2
TOKEN = b"x-service-token"

Headers = list[tuple[bytes, bytes]]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encoded(part: dict[str, Any] | str | bytes) -> bytes:
    """A JOSE part as its JSON (a dict), or exactly the text or bytes given."""
    if isinstance(part, dict):
        return json.dumps(part, separators=(",", ":")).encode()
    return part.encode() if isinstance(part, str) else part


@dataclass
class Forge:
    """Makes tokens: valid ones, and every way of bending one."""

    private: dict[str, ed25519.Ed25519PrivateKey]
    canary: str

    def header(self, **changes: Any) -> dict[str, Any]:
        """A valid header from the caller; a change of None drops the member."""
        base = {"alg": "EdDSA", "typ": "JWT", "kid": CALLER, **changes}
        return {k: v for k, v in base.items() if v is not None}

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Valid claims from the caller to the target; a change of None drops the claim."""
        now = time.time()
        base = {"iss": CALLER, "sub": CALLER, "aud": TARGET, "iat": int(now),
                "exp": int(now) + 60, "jti": uuid.uuid4().hex, **changes}
        return {k: v for k, v in base.items() if v is not None}

    def claims_text(self, **literals: str) -> str:
        """Valid claims as JSON text, each of `literals` written exactly as given."""
        members = {k: json.dumps(v) for k, v in self.claims().items()}
        members.update(literals)
        return "{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}"

    def signed(self, header: dict[str, Any] | str | bytes | None = None,
               payload: dict[str, Any] | str | bytes | None = None, *, by: str = CALLER) -> str:
        """A token signed with `by`'s real private key (Ed25519)."""
        signing_input = self.signing_input(header, payload)
        signature = self.private[by].sign(signing_input.encode())
        return f"{signing_input}.{b64(signature)}"

    def signing_input(self, header: dict[str, Any] | str | bytes | None = None,
                      payload: dict[str, Any] | str | bytes | None = None) -> str:
        head = self.header() if header is None else header
        body = self.claims() if payload is None else payload
        return f"{b64(encoded(head))}.{b64(encoded(body))}"

    def hmac_signed(self, secret: bytes) -> str:
        """HS256 with `secret`: the classic confusion when a verifier trusts the token's alg."""
        signing_input = self.signing_input(self.header(alg="HS256"))
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"

    def relabelled(self, alg: Any) -> str:
        """A valid token whose header now names another `alg`; the signature is untouched."""
        _, payload, signature = self.signed().split(".")
        return f"{b64(encoded(self.header(alg=alg)))}.{payload}.{signature}"

    def valid(self) -> str:
        return self.signed()

    # The issuer's public key in the forms an HS256 confusion attack uses as the secret.
    def public_pem(self) -> bytes:
        return self.private[CALLER].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_jwk_text(self, *, compact: bool) -> bytes:
        jwk = public_jwk(self.private[CALLER].public_key(), kid=CALLER, algorithm="EdDSA")
        return json.dumps(jwk, separators=(",", ":") if compact else None).encode()

    def public_raw(self) -> bytes:
        return self.private[CALLER].public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Attack:
    name: str
    headers: Callable[[Forge], Headers]
    target: Callable[[Forge], bytes] = lambda f: b"/claims/1"
    status: int = 401
    reason: str = "token_invalid"


def token(make: Callable[[Forge], str | bytes]) -> Callable[[Forge], Headers]:
    """The headers of a request carrying one `x-service-token` made by `make`."""

    def headers(forge: Forge) -> Headers:
        value = make(forge)
        return [(TOKEN, value if isinstance(value, bytes) else value.encode())]

    return headers


def attack(name: str, make: Callable[[Forge], str | bytes], **expect: Any) -> Attack:
    return Attack(name, token(make), **expect)


def hostile_kid(kid: Any) -> Callable[[Forge], str]:
    return lambda f: f.signed(f.header(kid=kid))


def now() -> int:
    return int(time.time())


def ahead(seconds: int) -> int:
    """`seconds` from this moment (negative: in the past), rounded up to a whole second."""
    return math.ceil(time.time()) + seconds


def behind(seconds: int) -> int:
    """`seconds` before this moment, rounded down to a whole second."""
    return math.floor(time.time()) - seconds


def lifetime(seconds: int) -> Callable[[Forge], str]:
    """A token living exactly `seconds`, from one reading of the clock."""
    def make(f: Forge) -> str:
        issued = now()
        return f.signed(payload=f.claims(iat=issued, exp=issued + seconds))
    return make


ATTACKS = [
    # -- the algorithm is the key's, never the token's -------------------------------------
    *[attack(f"alg-{alg}", lambda f, alg=alg: f.signing_input(f.header(alg=alg)) + ".")
      for alg in ("none", "None", "NONE", "nOnE")],
    attack("alg-none-keeping-the-signature", lambda f: f.relabelled("none")),
    attack("empty-signature", lambda f: f.signing_input() + "."),
    attack("no-alg", lambda f: f.signed(f.header(alg=None))),
    attack("alg-null", lambda f: f.signed(f.header() | {"alg": None})),
    attack("hs256-public-key-pem", lambda f: f.hmac_signed(f.public_pem())),
    attack("hs256-public-key-jwk", lambda f: f.hmac_signed(f.public_jwk_text(compact=False))),
    attack("hs256-public-key-jwk-compact",
           lambda f: f.hmac_signed(f.public_jwk_text(compact=True))),
    attack("hs256-public-key-raw", lambda f: f.hmac_signed(f.public_raw())),
    *[attack(f"relabelled-{alg}", lambda f, alg=alg: f.relabelled(alg))
      for alg in ("ES256", "RS256", "HS256", "EdDSA ", "eddsa", "Ed25519")],
    # -- whose key, whose name -------------------------------------------------------------
    attack("kid-not-iss", lambda f: f.signed(payload=f.claims(iss=OTHER))),
    attack("kid-of-another-service", lambda f: f.signed(f.header(kid=OTHER))),
    attack("iss-and-kid-of-another-service",
           lambda f: f.signed(f.header(kid=OTHER), f.claims(iss=OTHER, sub=OTHER))),
    attack("iss-missing", lambda f: f.signed(payload=f.claims(iss=None))),
    attack("iss-not-a-string", lambda f: f.signed(payload=f.claims(iss=[CALLER]))),
    *[attack(f"partial-iss-{i}", lambda f, iss=iss: f.signed(payload=f.claims(iss=iss)))
      for i, iss in enumerate(["kiosk-2", "kios", "kiosk ", " kiosk", "kiosk\x00", "kiosk.b"])],
    # -- audience --------------------------------------------------------------------------
    *[attack(f"audience-{i}", lambda f, aud=aud: f.signed(payload=f.claims(aud=aud)))
      for i, aud in enumerate([OTHER, [TARGET, OTHER], [OTHER, TARGET], [], "bb", "b ", "",
                               [TARGET, 7], 7, {"b": True}, "*"])],
    attack("audience-missing", lambda f: f.signed(payload=f.claims(aud=None))),
    # -- time ------------------------------------------------------------------------------
    attack("exp-missing", lambda f: f.signed(payload=f.claims(exp=None))),
    attack("iat-missing", lambda f: f.signed(payload=f.claims(iat=None))),
    attack("expired-beyond-skew",
           lambda f: f.signed(payload=f.claims(iat=behind(91), exp=behind(SKEW + 1)))),
    attack("iat-future-beyond-skew",
           lambda f: f.signed(payload=f.claims(iat=ahead(SKEW + MARGIN), exp=ahead(91)))),
    attack("nbf-future-beyond-skew",
           lambda f: f.signed(payload=f.claims(nbf=ahead(SKEW + MARGIN)))),
    attack("exp-before-iat", lambda f: f.signed(payload=f.claims(iat=now(), exp=now() - 100))),
    attack("ttl-over-max", lifetime(MAX_TTL + 1)),
    attack("ttl-far-over-max",
           lambda f: f.signed(payload=f.claims(iat=now() - 10, exp=now() + 10**9))),
    # -- numbers that do not fit -----------------------------------------------------------
    *[attack(f"{claim}-{label}", lambda f, claim=claim, text=text:
             f.signed(payload=f.claims_text(**{claim: text})))
      for claim in ("exp", "iat", "nbf")
      for label, text in [("1e400-digits", "1" + "0" * 400), ("1e400", "1e400"),
                          ("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
                          ("-1e400-digits", "-1" + "0" * 400), ("year-10000", "253402300800")]],
    attack("exp-5000-digits", lambda f: f.signed(payload=f.claims_text(exp="9" * 5000))),
    attack("exp-true", lambda f: f.signed(payload=f.claims_text(exp="true"))),
    attack("iat-false", lambda f: f.signed(payload=f.claims_text(iat="false"))),
    attack("exp-string", lambda f: f.signed(payload=f.claims(exp=str(now() + 60)))),
    attack("exp-list", lambda f: f.signed(payload=f.claims(exp=[now() + 60]))),
    attack("iat-negative", lambda f: f.signed(payload=f.claims(iat=-1))),
    # -- hostile kids ----------------------------------------------------------------------
    *[attack(f"kid-{label}", hostile_kid(kid)) for label, kid in [
        ("path", "../../../../etc/passwd"), ("crlf", "kiosk\r\nx-source-service: admin"),
        ("nul", "kiosk\x00"), ("kelvin-sign", "\u212aiosk"), ("dotless-i", "k\u0131osk"),
        ("sql", "' OR '1'='1"), ("star", "*"), ("empty", ""), ("number", 7),
        ("list", [CALLER]), ("object", {"$ne": ""}), ("null", None), ("long", "k" * 4000)]],
    attack("kid-canary-url", lambda f: f.signed(f.header(kid=f.canary + "/jwks.json"))),
    # -- headers that would fetch or trust key material ------------------------------------
    attack("jku", lambda f: f.signed(f.header(jku=f.canary + "/jwks.json"))),
    attack("x5u", lambda f: f.signed(f.header(x5u=f.canary + "/cert.pem"))),
    attack("jwk-embedded-attacker-key", lambda f: embedded_jwk(f)),
    attack("x5c", lambda f: f.signed(f.header(x5c=["MIIBszCCAVmgAwIBAgIUQ"]))),
    attack("crit", lambda f: f.signed(f.header(crit=["exp"]))),
    attack("crit-empty", lambda f: f.signed(f.header(crit=[]))),
    attack("b64-false", lambda f: f.signed(f.header(b64=False, crit=["b64"]))),
    # -- malformed -------------------------------------------------------------------------
    *[attack(f"malformed-{label}", lambda f, value=value: value) for label, value in [
        ("one-segment", "abc"), ("two-segments", "abc.def"), ("four-segments", "a.b.c.d"),
        ("five-segments", "a.b.c.d.e"), ("empty-segments", ".."), ("bad-base64", "!!!.###.$$$"),
        ("header-not-json", b64(b"not json") + ".e30.sig"),
        ("header-non-utf8", b64(b"\xff\xfe\xfd") + ".e30.sig"),
        ("header-array", b64(b"[]") + ".e30.sig"),
        ("header-nested", b64(b"[" * 3000) + ".e30.sig"),
        ("raw-non-utf8-bytes", b"\xff\xfe." + b"a" * 10 + b".b")]],
    attack("payload-not-json", lambda f: f.signed(payload="not json")),
    attack("payload-array", lambda f: f.signed(payload="[]")),
    attack("payload-non-utf8", lambda f: f.signed(payload=b"\xff\xfe{}")),
    attack("payload-nested", lambda f: f.signed(payload="[" * 3000)),
    attack("two-tokens-joined", lambda f: f.valid() + "," + f.valid()),
    attack("over-8KiB", lambda f: f.signed(f.header(pad="x" * 9000)),
           status=431, reason="headers_too_large"),
    attack("64KiB", lambda f: "x" * 65536, status=431, reason="headers_too_large"),
    # -- the token somewhere else, or twice ------------------------------------------------
    Attack("in-query", lambda f: [], reason="token_missing",
           target=lambda f: b"/claims/1?x-service-token=" + f.valid().encode()),
    Attack("in-cookie", lambda f: [(b"Cookie", b"x-service-token=" + f.valid().encode())],
           reason="token_missing"),
    Attack("in-authorization", lambda f: [(b"Authorization", b"Bearer " + f.valid().encode())],
           reason="token_missing"),
    Attack("look-alike-header-name", lambda f: [(b"x_service_token", f.valid().encode())],
           reason="token_missing"),
    Attack("two-tokens", lambda f: [(TOKEN, f.valid().encode()), (TOKEN, f.valid().encode())]),
]


def embedded_jwk(forge: Forge) -> str:
    """Signed by the attacker's own key, which the header offers as the one to trust."""
    attacker = ed25519.Ed25519PrivateKey.generate()
    forge.private["attacker"] = attacker
    jwk = public_jwk(attacker.public_key(), kid=CALLER, algorithm="EdDSA")
    return forge.signed(forge.header(jwk=jwk), by="attacker")


# Just inside each boundary: these must pass, or the attacks above prove nothing.
ACCEPTED = {
    "expired-within-skew": lambda f: f.signed(payload=f.claims(
        iat=behind(89), exp=ahead(MARGIN - SKEW))),
    "iat-future-within-skew": lambda f: f.signed(payload=f.claims(
        iat=now() + SKEW - 1, exp=ahead(89))),
    "nbf-future-within-skew": lambda f: f.signed(payload=f.claims(nbf=now() + SKEW - 1)),
    "ttl-exactly-max": lifetime(MAX_TTL),
    "audience-list-of-one": lambda f: f.signed(payload=f.claims(aud=[TARGET])),
    "kid-other-letter-case": lambda f: f.signed(f.header(kid="KIOSK")),
}


@dataclass
class Corpus:
    sidecar: SidecarProcess
    app: Upstream
    canary: Canary
    forge: Forge

    def audit(self) -> list[dict[str, Any]]:
        return read_records(self.sidecar.audit_path)

    async def audited_after(self, count: int) -> dict[str, Any]:
        return await audit_record_after(self.sidecar.audit_path, count)

    async def send(self, headers: Headers, target: bytes = b"/claims/1") -> Answer:
        return await exchange(self.sidecar.inbound, request(target, headers))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def corpus(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Corpus]:
    workdir = tmp_path_factory.mktemp("token-attacks")
    mesh = Mesh(workdir, [CALLER, TARGET, OTHER])
    app = await Upstream().start()
    canary = await Canary().start()
    sidecar = mesh.sidecar(
        TARGET,
        identity={**mesh.keyring.identity(TARGET), "clock_skew": f"{SKEW}s",
                  "max_token_ttl": f"{MAX_TTL}s"},
        inbound={"app": app.url, "public_paths": ["/health"],
                 "policy": [{"from": [CALLER], "methods": ["GET"], "paths": ["/claims/*"]}]},
    )
    private = {name: load_private_key(mesh.keyring.private_key(name), "EdDSA")
               for name in (CALLER, OTHER)}
    try:
        await sidecar.start()
        yield Corpus(sidecar, app, canary, Forge(private=private, canary=canary.url))
    finally:
        await mesh.stop()
        await app.stop()
        await canary.stop()


async def still_serving(corpus: Corpus) -> None:
    seen, audited = len(corpus.app.seen), len(corpus.audit())
    answer = await corpus.send([(TOKEN, corpus.forge.valid().encode())])
    assert answer.status == 200, answer.body
    assert len(corpus.app.seen) == seen + 1
    assert corpus.app.seen[-1].headers["x-source-service"] == CALLER
    # Its record is written before the next case counts the records.
    assert (await corpus.audited_after(audited))["decision"] == "allowed"


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_an_attack_is_refused_and_reaches_nothing(corpus: Corpus, attack: Attack) -> None:
    forwarded, audited = len(corpus.app.seen), len(corpus.audit())
    headers = attack.headers(corpus.forge)

    answer = await corpus.send(headers, attack.target(corpus.forge))

    assert (answer.status, answer.reason) == (attack.status, attack.reason), answer.body
    assert len(corpus.app.seen) == forwarded, "the app received the call"
    for _, value in headers:
        assert value[:64] not in answer.body or len(value) < 16, "the answer echoes the token"
    record = await corpus.audited_after(audited)
    assert (record["decision"], record["reason"], record["source"]) == (
        "denied", attack.reason, "anonymous")
    assert corpus.canary.connections == 0, "the sidecar dialled what the token pointed at"
    await still_serving(corpus)


@pytest.mark.parametrize("name", list(ACCEPTED))
async def test_just_inside_each_boundary_a_token_passes(corpus: Corpus, name: str) -> None:
    forwarded, audited = len(corpus.app.seen), len(corpus.audit())
    answer = await corpus.send([(TOKEN, ACCEPTED[name](corpus.forge).encode())])
    assert answer.status == 200, answer.body
    assert len(corpus.app.seen) == forwarded + 1
    assert corpus.app.seen[-1].headers["x-source-service"] == CALLER
    assert "x-service-token" not in corpus.app.seen[-1].headers
    assert (await corpus.audited_after(audited))["decision"] == "allowed"


async def test_nothing_was_ever_fetched(corpus: Corpus) -> None:
    assert corpus.canary.connections == 0
    assert corpus.sidecar.running
