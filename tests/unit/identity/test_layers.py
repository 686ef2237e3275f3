"""The identity layers: attach a token outbound, verify it inbound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.clock import FakeClock
from sidecar.identity import keys
from sidecar.identity.layers import attach_token, verify_token
from sidecar.identity.tokens import Minter, Verifier
from tests.support.calls import Next, make_call, target
from tests.support.policy import unconfigured


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Minter, Verifier]:
    clock = FakeClock()
    for name in ("a", "b"):
        keys.generate(service=name, out_dir=tmp_path)
    (tmp_path / "jwks.json").write_text(json.dumps(keys.merge_jwks([tmp_path])))
    keyset = keys.load_keyset(tmp_path / "jwks.json")
    minter = Minter(service="a", algorithm="EdDSA",
                    key=keys.load_private_key(tmp_path / "a.pem", "EdDSA"), ttl=60, clock=clock)
    verifier = Verifier(service="b", keys=keyset, max_ttl=300, skew=30, clock=clock)
    return minter, verifier


async def test_token_attached_for_mesh_services_only(identity: tuple[Minter, Verifier]) -> None:
    minter, verifier = identity
    downstream = Next()
    layer = attach_token(minter=minter)
    mesh_call = make_call("/x", to=target("b"))
    mesh_call.headers["x-service-token"] = "from-the-app"
    await layer(mesh_call, downstream)
    assert verifier.verify(downstream.calls[0].headers["x-service-token"]) == "a"
    outside = make_call("/x", to=target("payer", endpoints=("https://p",), mesh=False))
    await layer(outside, downstream)
    assert "x-service-token" not in downstream.calls[1].headers


async def test_verify_token_sets_source_and_hides_token(identity: tuple[Minter, Verifier]) -> None:
    minter, verifier = identity
    policy = unconfigured(public=("/health",))
    layer = verify_token(service="b", verifier=verifier, is_public=policy.is_public)
    downstream = Next()
    inbound = make_call("/claims", direction="inbound")
    inbound.headers["x-service-token"] = minter.token_for("b")
    inbound.headers["x-source-service"] = "forged"
    await layer(inbound, downstream)
    seen = downstream.calls[0]
    assert seen.source == "a" and seen.headers["x-source-service"] == "a"
    assert "x-service-token" not in seen.headers
    missing = await layer(make_call("/claims", direction="inbound"), downstream)
    assert missing.status == 401 and missing.reason == "token_missing"
    wrong_audience = make_call("/claims", direction="inbound")
    wrong_audience.headers["x-service-token"] = minter.token_for("c")
    bad = await layer(wrong_audience, downstream)
    assert bad.reason == "token_invalid"
    assert isinstance(bad.body, bytes) and b"audience" in bad.body
    public = await layer(make_call("/health", direction="inbound"), downstream)
    assert public.status == 200 and downstream.calls[-1].source == "anonymous"
